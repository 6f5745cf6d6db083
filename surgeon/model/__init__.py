"""A CLIP model and its heads: loading, the hook points into open_clip, decomposition, surgery."""

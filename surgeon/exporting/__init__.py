"""Writing a pruned model out: checkpoints, ONNX, quantization, the model card."""

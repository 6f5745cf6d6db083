"""The toy world (a seeded generator with ground truth) and the small CLIP trained on it.

`surgeon.inputs.toy.world` needs only numpy and PIL; `surgeon.studies.toy_train` imports torch and open_clip.
"""

from surgeon.inputs.toy.world import (
    FACTOR_CONCEPTS,
    FACTORS,
    BiasProbe,
    ToyBatch,
    ToyWorld,
    WorldConfig,
    ZeroShotTask,
    bias_probe,
    get_world,
    iter_batches,
    toy_images,
    toy_pool,
    toy_pool_concepts,
    toy_taxonomy,
    write_png_folder,
    zeroshot_tasks,
)

__all__ = [
    "FACTORS",
    "FACTOR_CONCEPTS",
    "BiasProbe",
    "ToyBatch",
    "ToyWorld",
    "WorldConfig",
    "ZeroShotTask",
    "bias_probe",
    "get_world",
    "iter_batches",
    "toy_images",
    "toy_pool",
    "toy_pool_concepts",
    "toy_taxonomy",
    "write_png_folder",
    "zeroshot_tasks",
]

"""QAR (Malchiodi et al. 2026) on CIFAR-10 (AlexNet, VGG-16; docs/method.md §1).

Each model trains in full precision with the clustering penalty pulling weights toward
2^b learnable representatives per layer, then every weight is snapped to its nearest
representative; trials.parquet gains `test_acc_before_snap`, `snap_acc_drop` and
`compression_ratio` (32/b plus codebook overhead). FP32 baselines train beside them.

    python studies/qar_cifar10.py --data-root DIR [--gpus-per-trial 0.5]
"""

from qgen_ray.pipeline.study import Study
from qgen_ray.pipeline.study_cli import main

STUDY = Study(
    name="qar_cifar10",
    description="QAR on CIFAR-10: AlexNet and VGG-16 at 8/4/2 bits, snapped to codebooks.",
    dataset="cifar10",
    model="alexnet_cifar",
    grid={"model": ["alexnet_cifar", "vgg16_cifar"]},
    precisions=(("fp32", 32), ("qar", 8), ("qar", 4), ("qar", 2)),
    protocol={
        "optimizer": "sgd",
        "lr": 0.05,
        "weight_decay": 5e-4,
        "epochs": 200,
        "batch_size": 128,
        "milestones": (80, 160),
    },
    smoke_grid={"model": ["alexnet_cifar"]},
    smoke_protocol={"epochs": 1, "milestones": (1,)},
    smoke_precisions=(("fp32", 32), ("qar", 2)),
    cpus_per_trial=2.0,
    gpus_per_trial=0.5,
    stages=("train", "report"),
)

if __name__ == "__main__":
    main(STUDY)

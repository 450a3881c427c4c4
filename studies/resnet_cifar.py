"""CIFAR ResNet-18 / ResNet-50 (base width 16) at FP32 / int8 / int4 / int2 (docs/method.md §2).

Protocol: SGD lr 0.1, momentum 0.9, batch 128, 200 epochs, lr x0.1 at 80 and 160.

    python studies/resnet_cifar.py --data-root DIR [--gpus-per-trial 0.5]
"""

from qgen_ray.pipeline.study import Study
from qgen_ray.pipeline.study_cli import main

STUDY = Study(
    name="resnet_cifar",
    description="CIFAR-10 ResNet-18/50 (base width 16) at four precisions, 200 epochs.",
    dataset="cifar10",
    model="resnet18_cifar",
    grid={"model": ["resnet18_cifar", "resnet50_cifar"], "weight_decay": [5e-4]},
    protocol={
        "optimizer": "sgd",
        "lr": 0.1,
        "epochs": 200,
        "batch_size": 128,
        "milestones": (80, 160),
    },
    smoke_grid={"model": ["resnet18_cifar"], "weight_decay": [5e-4]},
    smoke_protocol={"epochs": 1, "milestones": (1,)},
    smoke_precisions=(("fp32", 32), ("lsq", 2)),
    cpus_per_trial=2.0,
    gpus_per_trial=0.5,
    stages=("train", "measure", "corrupt", "report"),
)

if __name__ == "__main__":
    main(STUDY)

"""The paper's distortion study on CIFAR-100 (QGen §4.3, Appendix C; docs/method.md §6).

ResNet-18, MobileNet-V1 and VGG-19 at FP32 / int8 / int4 / int2, then every model on the
15 corruptions x 5 severities: gap = corrupted test loss - clean training loss (Tables
4-6 of the report). Pass `--corrupt-root` with the published CIFAR-100-C arrays, or leave
it out to generate the corruptions on the fly (seeded, cached in the study folder).

    python studies/corruption_cifar100.py --data-root DIR [--corrupt-root CIFAR-100-C]
"""

from qgen_ray.pipeline.study import Study
from qgen_ray.pipeline.study_cli import main

STUDY = Study(
    name="corruption_cifar100",
    description="CIFAR-100 ResNet-18 / MobileNet-V1 / VGG-19 at four precisions, corrupted.",
    dataset="cifar100",
    model="resnet18_cifar",
    grid={"model": ["resnet18_cifar", "mobilenet_v1", "vgg19_cifar"]},
    protocol={
        "optimizer": "sgd",
        "lr": 0.1,
        "weight_decay": 5e-4,
        "epochs": 200,
        "batch_size": 128,
        "milestones": (80, 160),
    },
    smoke_grid={"model": ["mobilenet_v1"]},
    smoke_protocol={"epochs": 1, "milestones": (1,)},
    smoke_precisions=(("fp32", 32), ("lsq", 2)),
    cpus_per_trial=2.0,
    gpus_per_trial=0.5,
    stages=("train", "corrupt", "report"),
)

if __name__ == "__main__":
    main(STUDY)

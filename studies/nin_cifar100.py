"""The paper's NiN population on CIFAR-100 (METHOD.md §2, QGen §4.2 / Appendix B.3).

3^5 = 243 models per precision x {FP32, int8, int4, int2} = 972 models; batch 128,
300 epochs, lr x0.1 at epochs 100 and 200; kept epoch = lowest training loss.

    python studies/nin_cifar100.py --data-root DIR [--storage s3://...] [--gpus-per-trial 0.25]
"""

from qgen_ray.study import NIN_LR_GRID, Study
from qgen_ray.study_cli import main

STUDY = Study(
    name="nin_cifar100",
    description="NiN on CIFAR-100: 972 models (243 per precision), 300 epochs each.",
    dataset="cifar100",
    model="nin",
    grid={
        "lr": NIN_LR_GRID,
        "weight_decay": [0.0, 1e-4, 2e-4],
        "width": [8, 10, 12],
        "depth": [3, 4, 5],
    },
    protocol={"epochs": 300, "batch_size": 128, "milestones": (100, 200)},
    smoke_grid={"lr": {"sgd": [0.1]}, "weight_decay": [0.0], "width": [1], "depth": [2]},
    smoke_protocol={"epochs": 1, "milestones": (1,)},
    cpus_per_trial=2.0,
    gpus_per_trial=0.25,
    stages=("train", "measure", "report"),
)

if __name__ == "__main__":
    main(STUDY)

"""The offline demo: NiN on scikit-learn's digits, FP32 / int8 / int4 / int2, end to end.

A laptop-sized version of the paper's NiN population study (docs/method.md §2): a small grid
over optimizer and learning rate at four precisions (16 models), then the sharpness /
PAC-Bayes measures, a few corruptions, and the report. No download, minutes on 2 cores.

    python studies/demo.py [--storage DIR] [--smoke] [--address ADDR] ...
"""

from qgen_ray.pipeline.study import Study
from qgen_ray.pipeline.study_cli import main

STUDY = Study(
    name="demo",
    description="NiN on digits at FP32/int8/int4/int2: train, measure, corrupt, report.",
    dataset="digits",
    model="nin",
    grid={
        "lr": {"sgd": [0.1, 0.05], "adam": [2e-3, 1e-3]},
        "width": [1],
        "depth": [2],
    },
    protocol={"epochs": 12, "batch_size": 64, "milestones": (6, 9), "augment": False},
    smoke_grid={"lr": {"sgd": [0.1]}, "width": [1], "depth": [2]},
    smoke_protocol={"epochs": 2, "milestones": (1,)},
    cpus_per_trial=1.0,
    stages=("train", "measure", "corrupt", "landscape", "report"),
    stage_options={
        "corrupt": {
            "corruptions": ["gaussian_noise", "defocus_blur", "contrast"],
            "severities": [1, 3, 5],
        },
        "landscape": {"steps": 11, "per_precision": 1},
    },
)

if __name__ == "__main__":
    main(STUDY)

"""Search: the paper's NiN ranges plus the precision, on CIFAR-10 (a cluster study).

The ranges of the paper's NiN grid (docs/method.md §2) as search ranges, with the precision
(FP32, LSQ 2-8 bits) searched beside them: a few hundred models with ASHA, fractional GPUs.
Add "weight_bits" to the objectives for a Pareto front of accuracy against model size.

    python studies/search_nin_cifar10.py --data-root DATA [--storage s3://...] [--smoke] ...
"""

from qgen_ray.pipeline.search import SearchStudy, choice, log_uniform
from qgen_ray.pipeline.study_cli import main

STUDY = SearchStudy(
    name="search_nin_cifar10",
    description="Optuna search over precision and the NiN hyperparameters on CIFAR-10.",
    dataset="cifar10",
    model="nin",
    space={
        "precision": choice(["fp32", "lsq8", "lsq6", "lsq4", "lsq3", "lsq2"]),
        "optimizer": choice(["sgd", "adam", "rmsprop"]),
        "lr": {
            "sgd": log_uniform(0.01, 0.1),
            "adam": log_uniform(1e-4, 1e-3),
            "rmsprop": log_uniform(1e-4, 1e-3),
        },
        "weight_decay": log_uniform(1e-4, 2e-4, with_zero=True),
        "width": choice([8, 10, 12]),
        "depth": choice([2, 3, 4]),
    },
    budget=300,
    protocol={"epochs": 300, "batch_size": 128, "milestones": (100, 200)},
    objectives=("val_loss", "weight_bits"),
    val_fraction=0.1,
    grace_epochs=10,
    max_concurrent=16,
    smoke_budget=2,
    smoke_protocol={"epochs": 1, "milestones": (1,)},
    cpus_per_trial=2.0,
    gpus_per_trial=0.25,
    stages=("train", "report"),
)

if __name__ == "__main__":
    main(STUDY)

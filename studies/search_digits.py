"""Search: the bit width tuned with the other hyperparameters, NiN on digits (offline).

QGen §3 concludes that the quantization level is a regularizer to be tuned like weight
decay and the learning rate. This search lets Optuna (TPE, through Ray Tune) choose the
precision (FP32, LSQ 2-8 bits), optimizer, learning rate, weight decay and width of a NiN on
scikit-learn's digits, on a validation split carved from the training set; ASHA stops weak
models early. The test set is read only after the search, for the models it trained.

    python studies/search_digits.py [--storage DIR] [--smoke] [--address ADDR] ...
"""

from qgen_ray.pipeline.search import SearchStudy, choice, log_uniform
from qgen_ray.pipeline.study_cli import main

STUDY = SearchStudy(
    name="search_digits",
    description="Optuna search over precision and hyperparameters of NiN on digits.",
    dataset="digits",
    model="nin",
    space={
        "precision": choice(["fp32", "lsq8", "lsq4", "lsq3", "lsq2"]),
        "optimizer": choice(["sgd", "adam"]),
        "lr": {"sgd": log_uniform(0.01, 0.2), "adam": log_uniform(3e-4, 5e-3)},
        "weight_decay": log_uniform(1e-5, 1e-3, with_zero=True),
        "width": choice([1, 2]),
        "depth": choice([2]),
    },
    budget=32,
    protocol={"epochs": 8, "batch_size": 64, "milestones": (5, 7), "augment": False},
    val_fraction=0.2,
    grace_epochs=2,
    max_concurrent=2,
    smoke_budget=3,
    smoke_protocol={"epochs": 2, "milestones": (1,)},
    stages=("train", "report"),
)

if __name__ == "__main__":
    main(STUDY)

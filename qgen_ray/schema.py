"""The study folder's layout and the columns of its Parquet tables: the one contract
between training, the follow-up jobs (measures, corruptions, landscapes) and analysis.

    <storage>/<study>/
        study.json                  the study's declaration: grid axes, protocol, provenance
        trials.parquet              one row per model (TRIALS_COLUMNS + one column per axis)
        history.parquet             one row per model and epoch (HISTORY_COLUMNS)
        steps.parquet               learned LSQ step per layer (STEPS_COLUMNS), paper Fig. 1
        measures.parquet            sharpness / PAC-Bayes / norms (MEASURES_COLUMNS)
        corruptions.parquet         corrupted-input evaluation (CORRUPTIONS_COLUMNS)
        landscapes.parquet          2-D loss surfaces (LANDSCAPES_COLUMNS)
        trials/<model_id>/          per-model folder written by its trial:
            result.json             the finished row (written last, atomically)
            init.pt, final.pt       weights at step 0 and kept weights (lowest train loss)
            last.pt                 the latest epoch's full state, for resuming
        tune/                       Ray Tune's own experiment folders (TensorBoard files)
        report/                     report.md, report.html and the PNG figures

Analysis reads only the Parquet tables. Every follow-up table is keyed by `model_id`.
"""

from __future__ import annotations

STUDY_JSON = "study.json"
TRIALS = "trials.parquet"
HISTORY = "history.parquet"
STEPS = "steps.parquet"
MEASURES = "measures.parquet"
CORRUPTIONS = "corruptions.parquet"
LANDSCAPES = "landscapes.parquet"
TRIALS_DIR = "trials"
TUNE_DIR = "tune"
OPTUNA_JOURNAL = "optuna.journal"  # a search study's Optuna study (journal file storage)
REPORT_DIR = "report"

INIT_CKPT = "init.pt"
FINAL_CKPT = "final.pt"
LAST_CKPT = "last.pt"
RESULT_JSON = "result.json"

# Hyperparameter axes a study may vary. Each becomes a column of trials.parquet; the
# study's `axes` (those with more than one value) are the granulated-Kendall axes.
HPARAM_COLUMNS = [
    "dataset",  # registry name, e.g. "cifar10", "digits"
    "model",  # model registry name, e.g. "nin"
    "optimizer",  # "sgd" | "adam" | "rmsprop"
    "lr",  # initial learning rate
    "weight_decay",  # L2 coefficient (not applied to LSQ steps)
    "width",  # NiN width multiplier (channels = 25 * width); null for other models
    "depth",  # NiN depth multiplier (number of blocks); null for other models
    "bits",  # 32 for FP32, else 2..8
    "method",  # "fp32" | "lsq" | "vvtq" | "qar"
    "seed",
]

# Status values of a trial row.
STATUS_OK = "ok"
STATUS_DIVERGED = "diverged"  # a non-finite training loss stopped the run
STATUS_FAILED = "failed"  # an exception; `reason` holds it; a re-run retries it
# finite, but its kept model is no better than a constant guess (training loss above
# ln(classes) and accuracy at chance): kept out of the analysis like a diverged one
STATUS_DEGENERATE = "degenerate"
# a search study's model that ASHA stopped early on its validation loss: listed in
# trials.parquet, never analysed with the population (only "ok" rows are)
STATUS_STOPPED = "stopped"

TRIALS_COLUMNS = [
    "model_id",  # stable hash of the scientific settings (TrainSpec.model_id)
    *HPARAM_COLUMNS,
    "epochs",  # protocol: planned epochs
    "batch_size",
    "status",
    "reason",  # empty when ok
    "train_loss",  # kept model, eval mode, no augmentation, full training set
    "train_acc",  # accuracies are fractions in [0, 1]
    "test_loss",
    "test_acc",
    "gap_loss",  # test_loss - train_loss (the paper's generalization gap)
    "gap_acc",  # train_acc - test_acc
    "best_epoch",  # 1-based epoch with the lowest training loss (the kept weights)
    "epochs_run",
    "num_train",  # m, training-set size
    "num_params",  # omega, number of weights
    "seconds",  # wall time of the training function
    "finished_at",  # ISO-8601 UTC
    "init_ckpt",  # path relative to the study folder
    "final_ckpt",
    "device",
    "torch_version",
    "qgen_version",
    "git_rev",
]
# Search studies add: val_fraction, val_loss, val_acc (the validation split carved from the
# training set; train_* are then on the rest of it) and weight_bits (weights as stored).
SEARCH_COLUMNS = ["val_fraction", "val_loss", "val_acc", "weight_bits"]
# Every model trained through Tune adds where it ran: node_id (the Ray node), gpu_share
# (the GPU fraction Ray assigned its trial; 0.25 = four trials per GPU) and run_id (the
# Tune run of the study that wrote the row).
PLACEMENT_COLUMNS = ["node_id", "gpu_share", "run_id"]

HISTORY_COLUMNS = ["model_id", "epoch", "train_loss", "train_acc", "lr", "seconds"]

STEPS_COLUMNS = ["model_id", "layer", "layer_index", "bits", "step"]

MEASURES_COLUMNS = [
    "model_id",
    "measure",  # e.g. "pacbayes_mag_init", "sharpness_orig", "weight_norm"
    "value",  # the bound (or the norm for weight_norm)
    "sigma",  # the searched sigma / alpha (NaN when there is no search)
    "flatness",  # 1/sigma^2 or 1/alpha^2 (NaN when there is no search)
    "converged",  # bool: the search met its tolerance
    "mode",  # "fast" | "faithful" (searched measures) | "exact" (weight_norm: computed, no search)
    "forward_images",  # images pushed through the network by this measurement
    "seconds",
    "paper_scale",  # sqrt(value / m), as the paper prints a bound (NaN for weight_norm)
]

CORRUPTIONS_COLUMNS = ["model_id", "corruption", "severity", "loss", "accuracy", "gap"]

LANDSCAPES_COLUMNS = ["model_id", "x", "y", "loss", "accuracy"]

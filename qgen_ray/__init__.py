"""qgen-ray: Ray-distributed hyperparameter studies of quantization-aware training.

Notebook entry points: `load_trials(study_dir)`, `load_model(study_dir, model_id)`,
`load_dataset(name, split, root=None)`.
"""

from qgen_ray.provenance import __version__

__all__ = ["__version__", "load_dataset", "load_model", "load_trials"]


def __getattr__(name: str):
    # Lazy: `import qgen_ray` stays cheap (no torch/pandas until a loader is used).
    if name in ("load_trials", "load_model"):
        from qgen_ray import loaders

        return getattr(loaders, name)
    if name == "load_dataset":
        from qgen_ray.data import load_dataset

        return load_dataset
    raise AttributeError(f"module 'qgen_ray' has no attribute {name!r}")

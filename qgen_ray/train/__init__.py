"""Training: the plain `train(spec, data) -> result` function and its helpers."""

from qgen_ray.train.build import build_model
from qgen_ray.train.evaluate import evaluate
from qgen_ray.train.loop import make_optimizer, resolve_device, train

__all__ = ["build_model", "evaluate", "make_optimizer", "resolve_device", "train"]

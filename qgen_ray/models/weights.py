"""Loading a saved state dict into a zoo model, with a one-line error when it does not fit.

Rule for the classifier head: if the file's head has another number of classes than the
model (e.g. ImageNet's 1000 into a 10-class model), every parameter and buffer under the
head module is skipped and keeps its fresh initialization; everything else must match
the architecture key for key and shape for shape. A `module.` (DistributedDataParallel)
or `_orig_mod.` (torch.compile) prefix on every key is removed first.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from qgen_ray.errors import UserError

SHOWN_KEYS = 3  # how many offending keys of each kind an error message names
# how a user passes a local file instead of published weights, in an error message's fix
WEIGHTS_FIX = (
    "pass a local state dict (--weights MODEL=PATH in the ImageNet studies, weights=<file> "
    "in Python)"
)


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict saved with `torch.save(model.state_dict(), path)` (tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; pass the path of a saved state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise UserError(
            f"weights file {path} is not a readable state dict ({err.__class__.__name__}); "
            "save it with torch.save(model.state_dict(), path)"
        ) from None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(
            f"weights file {path} holds a {type(state).__name__}, not a state dict of tensors; "
            "save it with torch.save(model.state_dict(), path)"
        )
    return dict(state)


def _under(key: str, module: str) -> bool:
    return key == module or key.startswith(module + ".")


def _names(keys: list[str]) -> str:
    more = len(keys) - SHOWN_KEYS
    return ", ".join(keys[:SHOWN_KEYS]) + (f" (+{more} more)" if more > 0 else "")


def load_fitting(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    name: str,
    head: str,
    source: str,
    origin: str,
) -> list[str]:
    """Load `state` into `model` (see the module docstring); return the skipped head keys.

    name: the model's registry name; head: its classifier module; source: what `state`
    is, for the error ("weights file x.pt"); origin: where a fitting file comes from.
    """
    state = dict(state)
    for prefix in ("module.", "_orig_mod."):
        consume_prefix_in_state_dict_if_present(state, prefix)
    own = model.state_dict()
    shared = [k for k in own if k in state]  # in the model's order: first layer first
    mismatched = [k for k in shared if own[k].shape != state[k].shape]
    other_head = any(_under(k, head) for k in mismatched)
    skipped = [k for k in state if other_head and _under(k, head)]
    problems = []
    missing = [k for k in own if k not in state and not (other_head and _under(k, head))]
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected := [k for k in state if k not in own]:
        problems.append(f"unexpected {_names(unexpected)}")
    if wrong := [k for k in mismatched if not _under(k, head)]:
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong]
        problems.append(f"shapes (file vs model) {_names(shapes)}")
    if problems:
        raise UserError(
            f"{source} does not fit {name}: {'; '.join(problems)}; "
            f"pass the file saved from {origin}"
        )
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return skipped


def load_weights_file(
    model: nn.Module, path: str | Path, *, name: str, head: str, origin: str
) -> list[str]:
    """Read the state dict at `path` and load it into `model`; return the skipped head keys."""
    state = read_weights_file(path)
    return load_fitting(
        model, state, name=name, head=head, source=f"weights file {path}", origin=origin
    )

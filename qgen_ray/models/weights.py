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


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without a `module.` (DistributedDataParallel) or `_orig_mod.` (torch.compile)
    prefix on every key."""
    state = dict(state)
    for prefix in ("module.", "_orig_mod."):
        consume_prefix_in_state_dict_if_present(state, prefix)
    return state


def head_classes(state: Mapping[str, torch.Tensor], head: str) -> int | None:
    """The number of classes of the head `head` in `state` (None when it has none)."""
    weight = state.get(f"{head}.weight")
    return None if weight is None else int(weight.shape[0])


def _fit_problems(
    own: list[str], keys: list[str], head: str, other_head: bool, spare: set[str] = frozenset()
) -> list[str]:
    """What keeps a state dict with `keys` from fitting a model with `own` keys: missing
    and unexpected keys, the head's left out when it is another class count's (`other_head`),
    `spare` file keys the model may hold as non-persistent buffers (timm's Swin tables)."""
    problems = []
    missing = [k for k in own if k not in keys and not (other_head and _under(k, head))]
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected := [k for k in keys if k not in own and k not in spare]:
        problems.append(f"unexpected {_names(unexpected)}")
    return problems


def _refuse(source: str, name: str, origin: str, problems: list[str]) -> None:
    if problems:
        raise UserError(
            f"{source} does not fit {name}: {'; '.join(problems)}; "
            f"pass the file saved from {origin}"
        )


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
    state = strip_prefixes(state)
    own = model.state_dict()
    shared = [k for k in own if k in state]  # in the model's order: first layer first
    mismatched = [k for k in shared if own[k].shape != state[k].shape]
    other_head = any(_under(k, head) for k in mismatched)
    skipped = [k for k in state if other_head and _under(k, head)]
    problems = _fit_problems(list(own), list(state), head, other_head)
    if wrong := [k for k in mismatched if not _under(k, head)]:
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong]
        problems.append(f"shapes (file vs model) {_names(shapes)}")
    _refuse(source, name, origin, problems)
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return skipped


def check_loaded_keys(
    model: nn.Module, keys: list[str], *, other_head: bool, name: str, head: str, source: str,
    origin: str,
) -> None:  # fmt: skip
    """After a library loaded a state dict with `keys` into `model` by its own rules (timm:
    resampled position embeddings, so shapes may differ): every key of the model came from
    the file (the head aside when `other_head`), and the file held nothing else."""
    spare = {n for n, _ in model.named_buffers()}
    _refuse(
        source, name, origin, _fit_problems(list(model.state_dict()), keys, head, other_head, spare)
    )


def load_weights_file(
    model: nn.Module, path: str | Path, *, name: str, head: str, origin: str
) -> list[str]:
    """Read the state dict at `path` and load it into `model`; return the skipped head keys."""
    state = read_weights_file(path)
    return load_fitting(
        model, state, name=name, head=head, source=f"weights file {path}", origin=origin
    )

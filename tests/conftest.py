"""Shared fixtures: offline hub, CIFAR folders written in torchvision's pickle format."""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
REPO = Path(__file__).resolve().parents[1]

# Statistical tests (marked `statistical`) shift every seed they draw by QGEN_TEST_SEED and
# run torch with QGEN_TEST_THREADS intra-op threads. CI runs the defaults (0, 1);
# `make test-stats` runs them under five other seeds and 1 and 2 threads, so a verdict
# that holds only for one seed or one summation order shows up there.
TEST_SEED = int(os.environ.get("QGEN_TEST_SEED", "0"))
TEST_THREADS = int(os.environ.get("QGEN_TEST_THREADS", "1"))


def load_script(name: str):
    """The module of studies/<name>.py (its STUDY, main, ...), not run as a script."""
    spec = importlib.util.spec_from_file_location(name, REPO / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_cifar_fixture(
    root: Path, variant: str = "cifar10", per_batch: int = 20, seed: int = 0
) -> Path:
    """A CIFAR folder in the published pickle layout with `per_batch` random images per
    file (5 train batches + test batch + meta). Returns root."""
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[variant]
    classes = 10 if variant == "cifar10" else 100
    label_key = "labels" if variant == "cifar10" else "fine_labels"
    rng = np.random.default_rng(seed)
    folder = root / cls.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    for name, _ in cls.train_list + cls.test_list:
        entry = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            label_key: rng.integers(0, classes, per_batch).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({cls.meta["key"]: [f"class{i}" for i in range(classes)]}, f)
    return root


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    """Test tensors are tiny: intra-op threads only add contention on a 2-core machine
    (Ray workers in subprocesses set their own). QGEN_TEST_THREADS overrides the 1."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def stat_seed() -> int:
    """The offset a statistical test adds to its seeds (QGEN_TEST_SEED, default 0)."""
    return TEST_SEED


@pytest.fixture
def cifar10_root(tmp_path, monkeypatch):
    """A CIFAR-10 fixture; torchvision's MD5 check is bypassed (parsing stays real)."""
    from torchvision import datasets
    from torchvision.datasets import cifar

    monkeypatch.setattr(datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    return write_cifar_fixture(tmp_path / "cifar")

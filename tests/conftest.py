"""Shared fixtures: offline hub, CIFAR folders written in torchvision's pickle format."""

from __future__ import annotations

import pytest

from tests.support.fixtures import TEST_SEED, TEST_THREADS, write_cifar_fixture


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

"""Shared fixtures: offline hub, CIFAR folders written in torchvision's pickle format, a
local S3 endpoint (moto's server: pyarrow's real S3 client against it)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cluster import free_ports
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


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment that points pyarrow's S3 filesystem at a local endpoint."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.fixture(scope="session")
def s3_endpoint():
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if server is None:
        pytest.skip("moto[server] is not installed (make install installs it)")
    (port,) = free_ports(1)
    proc = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("moto_server did not start")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)

"""The README runs as printed, so it cannot drift from the code.

Every fenced block of README.md names its language. A `bash` or `python` block runs here,
in README order, unless its first line says what it needs that a test machine has not
(`# needs: an AWS account`, `# needs: ImageNet on disk ...`). The one line not run is
`make test`: the suite itself. The blocks that need "a Ray cluster" (the study submitted
as a job, the same script on the head node, the measure job) run on Ray's real
autoscaler with fake GPU nodes (`tests/support/cluster.py:FakeCluster`), a moto S3
endpoint as the bucket and a CIFAR-10 folder in the published format; only addresses and
paths change, and the study commands get `--smoke` (so the follow-up names
`nin_cifar10-smoke`).

Slow (about 8 minutes on 2 cores: `make demo` from scratch is most of it) and run by
`make test`. The local job block ends with the README's `ray stop`, which stops every Ray
process of the user on the machine, so this module's tests keep no Ray alive between them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import s3_env
from tests.support.cluster import FakeCluster
from tests.support.fixtures import REPO, write_cifar_fixture

pytestmark = pytest.mark.slow

README = REPO / "README.md"
LANGUAGES = ("bash", "python", "text")
NEEDS = re.compile(r"^# needs: (\S.*)$")
CLUSTER = "a Ray cluster"
BUCKET = "qgen-readme"
VENV_BIN = str(Path(sys.executable).parent)


@dataclass
class Block:
    language: str
    lines: list[str]
    line: int  # where the block starts in README.md

    @property
    def needs(self) -> str | None:
        first = NEEDS.match(self.lines[0]) if self.lines else None
        return first.group(1) if first else None

    def commands(self) -> list[str]:
        """The block's shell commands, continuation lines joined, comments dropped."""
        text = "\n".join(line for line in self.lines if not line.lstrip().startswith("#"))
        return [c.strip() for c in text.replace("\\\n", " ").splitlines() if c.strip()]


def readme_blocks() -> list[Block]:
    blocks, current = [], None
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if line.startswith("```"):
            if current is None:
                current = Block(line[3:].strip(), [], number)
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.lines.append(line)
    assert current is None, f"README.md: the block at line {current.line} is not closed"
    return blocks


def test_every_block_names_its_language_and_says_what_it_needs():
    blocks = readme_blocks()
    for block in blocks:
        assert block.language in LANGUAGES, f"README.md line {block.line}: ```{block.language}"
    runnable = [b for b in blocks if b.language != "text"]
    assert [b for b in runnable if b.needs is None], "nothing in the README runs offline?"
    for block in runnable:
        if block.needs is None:  # run below: no line may silently depend on a cloud
            assert not any(re.search(r"\baws\b|\$BUCKET|ray (up|down|attach)\b", c)
                           for c in block.commands()), block.line  # fmt: skip
    assert len([b for b in runnable if (b.needs or "").startswith(CLUSTER)]) == 3


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MAKE", "MFLAGS"))}
    return {**env, "HOME": str(home), "PATH": f"{VENV_BIN}:{env['PATH']}", "HF_HUB_OFFLINE": "1"}


def test_the_offline_blocks_run_as_printed(tmp_path):
    """`make demo` (then the notebook lines read its results), the job workflow on one
    machine: each block through bash (or the venv's python) from the repository root."""
    import ray

    ray.shutdown()  # the README's `ray stop` ends every Ray process of the user
    env = _env(tmp_path)  # ~/.ray/auth_token of `ray get-auth-token` lands in tmp_path
    ran, start = [], time.time()
    try:
        for block in readme_blocks():
            if block.language == "text" or block.needs is not None:
                continue
            if block.language == "python":
                args = [sys.executable, "-c", "\n".join(block.lines)]
            else:
                lines = [c for c in block.commands() if c.split("#")[0].strip() != "make test"]
                args = ["bash", "-euo", "pipefail", "-c", "\n".join(lines)]
            out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=1800)  # fmt: skip
            output = (out.stdout + out.stderr)[-4000:]
            assert out.returncode == 0, f"README.md line {block.line}:\n{output}"
            ran.append(block.line)
    finally:  # a block that failed before the README's `ray stop` leaves no head behind
        subprocess.run([f"{VENV_BIN}/ray", "stop"], env=env, capture_output=True, timeout=120)
    assert len(ran) >= 3
    report = REPO / "results" / "demo" / "report" / "report.md"
    assert report.stat().st_mtime >= start - 1  # make demo's end, written by this run
    assert (REPO / "results" / "demo-smoke" / "trials.parquet").is_file()  # the local job's


# What every process of the fake cluster imports first (`sitecustomize` on its PYTHONPATH),
# each patch applied when its module loads:
# - torchvision checks the CIFAR files' MD5 against the published ones, which a fixture
#   cannot match: the check is skipped (the parsing stays real);
# - fake nodes share this machine's disk, and a node's runtime-env agent re-extracts the
#   job's working-dir package over the copy already there, deleting the head driver's
#   current folder under it (a real node has its own disk): an existing copy is reused.
CLUSTER_PATCHES = """
import importlib.abc, importlib.util, sys


def _cifar(module):
    module.check_integrity = lambda *a, **k: True
    module.CIFAR10._check_integrity = lambda self: True


def _working_dir(module):
    unpack = module.download_and_unpack_package

    async def download_and_unpack_package(*args, **kwargs):
        return await unpack(*args, **{**kwargs, "overwrite": False})

    module.download_and_unpack_package = download_and_unpack_package


PATCHES = {"torchvision.datasets.cifar": _cifar,
           "ray._private.runtime_env.working_dir": _working_dir}


class _Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Patch())
"""


def _as_on_the_fake_cluster(command: str, cluster: FakeCluster, data: Path) -> str:
    """The README's command with this machine's addresses and paths, at smoke size."""
    command = command.replace("http://127.0.0.1:8265", cluster.dashboard_url)
    command = command.replace("/home/ray/data", str(data)).replace("~/qgen-ray", str(REPO))
    command = command.replace("studies/nin_cifar10.py", "studies/nin_cifar10.py --smoke")
    return command.replace("/qgen/nin_cifar10 ", "/qgen/nin_cifar10-smoke ")


def test_the_cluster_commands_run_as_printed_on_a_fake_cluster(tmp_path, s3_endpoint):
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    commands = [c for b in readme_blocks() if (b.needs or "").startswith(CLUSTER)
                for c in b.commands()]  # fmt: skip
    assert [c.split()[:3] for c in commands] == [
        ["ray", "job", "submit"], ["cd", "~/qgen-ray", "&&"], ["ray", "job", "submit"]
    ]  # fmt: skip
    data = write_cifar_fixture(tmp_path / "data")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CLUSTER_PATCHES)
    keys = s3_env(s3_endpoint)
    fs = pafs.S3FileSystem(
        endpoint_override=s3_endpoint,
        access_key=keys["AWS_ACCESS_KEY_ID"],
        secret_key=keys["AWS_SECRET_ACCESS_KEY"],
        allow_bucket_creation=True,
    )
    fs.create_dir(BUCKET)
    env = {**_env(tmp_path), **keys, "PYTHONPATH": str(site), "BUCKET": BUCKET}
    gpu_node = {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 1}  # 4 trials of 2 CPUs
    outs = []
    with FakeCluster(head_cpus=1, worker_types={"gpu_worker": gpu_node}, dashboard=True,
                     env=env) as cluster:  # fmt: skip
        for command in commands:
            line = _as_on_the_fake_cluster(command, cluster, data)
            out = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=REPO,
                                 env={**cluster.env, "RAY_ADDRESS": cluster.address},
                                 capture_output=True, text=True, timeout=900)  # fmt: skip
            assert out.returncode == 0, f"{line}\n{(out.stdout + out.stderr)[-4000:]}"
            outs.append(out.stdout + out.stderr)
    study = f"{BUCKET}/qgen/nin_cifar10-smoke"
    trials = pq.read_table(f"{study}/trials.parquet", filesystem=fs).to_pandas()
    assert len(trials) == 4 and (trials["status"] == "ok").all()
    assert (trials["gpu_share"] == 0.25).all()  # on the fake-GPU node the autoscaler added
    assert "4 already done, 0 to train" in outs[1]  # the head-node run found the data root
    measures = pq.read_table(f"{study}/measures.parquet", filesystem=fs).to_pandas()
    assert len(measures) and not measures[["model_id", "measure"]].duplicated().any()
    assert set(measures["model_id"]) == set(trials["model_id"])
    assert fs.get_file_info(f"{study}/report/report.md").is_file

"""The study on a multi-node cluster that grows and shrinks under it: Ray's real
autoscaler with fake nodes on this machine (tests/support/cluster.py:FakeCluster).

a. trials with --gpus-per-trial 0.25 on a cluster with no GPU node: the autoscaler adds
   fake-GPU nodes and four trials share each fake GPU;
b. the measure stage starts on one worker node and its pool grows as more join;
c. a worker node killed mid-stage (a reclaimed spot node): its items go elsewhere, no
   row is lost or written twice;
d. when the work is done the cluster scales back down to the head.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from qgen_ray import schema
from tests.support.cluster import FakeCluster
from tests.support.fixtures import REPO

pytestmark = pytest.mark.slow

# four 0.25-GPU trials of 1 CPU fit one node; measure workers take a whole node each
GPU_NODE = {"resources": {"CPU": 4, "GPU": 1}, "max_workers": 2}
CPU_NODE = {"resources": {"CPU": 1}, "min_workers": 1, "max_workers": 3}
# two searches per model in the faithful protocol: long enough for nodes to join mid-stage
MEASURES = ["pacbayes_init", "pacbayes_orig", "sharpness_init", "sharpness_orig"]


@pytest.fixture(scope="module")
def cluster():
    with FakeCluster(head_cpus=1, worker_types={"gpu_worker": GPU_NODE,
                                                "cpu_worker": CPU_NODE}) as c:  # fmt: skip
        yield c


def _run(cluster: FakeCluster, args: list[str], timeout: float = 600) -> str:
    env = {**cluster.env, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([*args, "--address", cluster.address], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def trained(cluster, tmp_path_factory):
    """(a) The demo smoke's 4 models, 0.25 GPU each, on a cluster with no GPU node."""
    storage = tmp_path_factory.mktemp("fake") / "store"
    assert not [n for n in cluster.alive_nodes() if "GPU" in n["resources"]]
    t0 = time.time()
    out = _run(cluster, [sys.executable, "studies/demo.py", "--smoke", "--stages", "train",
                         "--storage", str(storage), "--gpus-per-trial", "0.25",
                         "--cpus-per-trial", "1", "--device", "cpu", "--quiet"])  # fmt: skip
    return {"study": storage / "demo-smoke", "out": out, "seconds": time.time() - t0}


def test_trials_share_fake_gpus_the_autoscaler_added(trained, cluster):
    trials = pd.read_parquet(trained["study"] / schema.TRIALS)
    assert len(trials) == 4 and (trials["status"] == "ok").all()
    per_node = trials["node_id"].value_counts()
    # every trial ran on a fake-GPU node the autoscaler launched, at most four per GPU
    assert per_node.max() <= 4 and per_node.max() >= 2, per_node
    assert cluster.head_node_id() not in set(per_node.index)  # the head has no GPU
    assert (trials["gpu_share"] == 0.25).all()  # what Ray assigned each trial
    print(
        f"[figure] (a) 4 trials on {len(per_node)} fake-GPU node(s) {per_node.tolist()} "
        f"in {trained['seconds']:.0f} s, Ray and node start-up included"
    )


def test_measure_pool_grows_survives_a_lost_node_and_the_cluster_scales_down(trained, cluster):
    study = trained["study"]
    deadline = time.time() + 120  # the GPU nodes of (a) go first: the pool starts small
    while [n for n in cluster.alive_nodes() if "GPU" in n["resources"]]:
        assert time.time() < deadline, cluster.alive_nodes()
        time.sleep(2)
    qgen = str(Path(sys.executable).with_name("qgen"))
    env = {**cluster.env, "PYTHONPATH": str(REPO)}
    args = [qgen, "measure", str(study), "--cpus-per-task", "1", "--measures", *MEASURES,
            "--mode", "faithful", "--address", cluster.address]  # fmt: skip
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines: list[str] = []
    killed = None
    t0 = time.time()
    for line in proc.stdout:
        lines.append(line)
        sizes = [int(m) for m in re.findall(r"workers: (\d+)", "".join(lines))]
        if killed is None and sizes and max(sizes) >= 2:
            killed = cluster.kill_node_running("ray::FanOutWorker.run")  # (c) mid-stage
    proc.wait(timeout=600)
    out = "".join(lines)
    assert proc.returncode == 0, out[-4000:]
    sizes = [int(m) for m in re.findall(r"workers: (\d+)", out)]
    first = next(s for s in sizes if s > 0)
    assert max(sizes) > first, (sizes, out[-3000:])  # (b) the pool grew as nodes joined
    assert sizes[-1] == 0  # and let every worker go at the end
    assert killed is not None and "a worker was lost" in out  # (c)
    measures = pd.read_parquet(study / schema.MEASURES)
    pairs = measures[["model_id", "measure"]]
    assert not pairs.duplicated().any()  # none written twice
    assert len(pairs) == 4 * len(MEASURES)  # none lost
    deadline = time.time() + 120  # (d) back to the head alone
    while len(cluster.alive_nodes()) > 1 + CPU_NODE["min_workers"]:
        assert time.time() < deadline, cluster.alive_nodes()
        time.sleep(2)
    print(
        f"[figure] (b-d) measure pool sizes {sizes}, a node killed, scaled down "
        f"{time.time() - t0:.0f} s after the stage started"
    )

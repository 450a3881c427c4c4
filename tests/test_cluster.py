"""Running on a cluster: cluster.yaml checked offline with Ray's own schema and our
security rules, credentials kept out of the repo and the logs, checkpoints that cannot
run code, and a study submitted as a Ray job to a head started with `ray start --head`
(the slow test: one Ray start, ~1 min on 2 cores)."""

from __future__ import annotations

import copy
import json
import pickle
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import ray
import torch
import yaml

from qgen_ray import cli, schema
from qgen_ray.ray.cluster_config import (
    check_cluster_config,
    find_credentials,
    load_cluster_config,
    placeholders,
    ray_schema_problems,
    security_problems,
)
from qgen_ray.ray.session import DASHBOARD_HOST_ENV, ray_init_kwargs
from qgen_ray.store import StudyStore
from tests.support.cluster import LocalHead, scan_repo, uncommented_keys
from tests.support.fixtures import REPO

CLUSTER_YAML = REPO / "cluster.yaml"
# GPUs per instance of the AWS types cluster.yaml may name (AWS's published figures).
AWS_GPUS = {"g5.2xlarge": 1, "g6.2xlarge": 1, "g5.48xlarge": 8, "p4d.24xlarge": 8}
# Every field a user is expected to edit; each must carry a comment.
EDITED_FIELDS = [
    "cluster_name", "max_workers", "idle_timeout_minutes", "head_image", "worker_image",
    "region", "availability_zone", "InstanceType", "ImageId", "IamInstanceProfile",
    "min_workers", "VolumeSize", "InstanceMarketOptions",
]  # fmt: skip
IN_FLIGHT = re.compile(r"demo-smoke: [0-3]/4 models done ")  # progress, mid-run
FAKE_AWS_KEY_ID = "AKIA" + "QGENTESTFAKEKEY0"  # split so the repo scan never sees it
FAKE_AWS_SECRET = "qgenTestFakeSecret/" + "x" * 21


@pytest.fixture
def config() -> dict:
    return load_cluster_config(CLUSTER_YAML)


def _filled(tmp_path: Path, config: dict | None = None) -> Path:
    """cluster.yaml with its placeholders filled in (or `config` written out)."""
    path = tmp_path / "cluster.yaml"
    text = CLUSTER_YAML.read_text().replace("<ami-id>", "ami-0123456789abcdef0")
    path.write_text(text if config is None else yaml.safe_dump(config))
    return path


def test_cluster_yaml_passes_rays_own_schema(config):
    assert ray_schema_problems(config) == []
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_1x"]["min_wokers"] = 1
    assert "min_wokers" in " ".join(ray_schema_problems(bad))
    bad = copy.deepcopy(config)
    bad["head_node_type"] = "nope"
    assert ray_schema_problems(bad)


def test_cluster_yaml_has_cpu_head_gpu_workers_py311_image_and_package_setup(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and head["node_config"]["InstanceType"] not in AWS_GPUS
    workers = {k: v for k, v in config["available_node_types"].items() if v is not head}
    gpus = sorted(AWS_GPUS[w["node_config"]["InstanceType"]] for w in workers.values())
    assert gpus == [1, 8]
    for worker in workers.values():
        assert worker["min_workers"] == 0 < worker["max_workers"]  # autoscaling from zero
        assert worker["node_config"]["IamInstanceProfile"]["Name"]  # S3 for the results
    docker = config["docker"]
    assert docker["head_image"] == f"rayproject/ray:{ray.__version__}-py311-cpu"
    assert docker["worker_image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert config["file_mounts"]["~/qgen-ray"] == "."
    assert any("pip install" in c and "-e ~/qgen-ray" in c for c in config["setup_commands"])
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_every_field_a_user_edits_is_commented():
    text = CLUSTER_YAML.read_text()
    assert uncommented_keys(text, EDITED_FIELDS) == []
    assert uncommented_keys("a: 1\n# about b\nb: 2\nc: 3  # about c\n", ["a", "b", "c"]) == [
        "a (line 1)"
    ]
    assert [p.split(": ", 1)[1] for p in placeholders(text)] == ["<ami-id>"]


def test_cluster_yaml_security_rules(config, tmp_path):
    assert security_problems(config) == [] and find_credentials(CLUSTER_YAML.read_text()) == []
    ssh = {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    mine = {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp",
            "IpRanges": [{"CidrIp": "203.0.113.7/32"}]}  # fmt: skip
    ok = copy.deepcopy(config)
    ok["provider"]["security_group"]["IpPermissions"] = [ssh, mine]
    assert security_problems(ok) == []

    def problems(edit) -> str:
        bad = copy.deepcopy(config)
        edit(bad)
        return " ".join(security_problems(bad))

    world = {**mine, "IpRanges": [], "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}
    sg = ["provider", "security_group", "IpPermissions"]
    assert "8265-8265 open to the world" in problems(lambda c: c[sg[0]][sg[1]].update(
        {sg[2]: [world]}))  # fmt: skip
    public = [c.replace("127.0.0.1", "0.0.0.0") for c in config["head_start_ray_commands"]]
    assert "binds to 0.0.0.0" in problems(lambda c: c.update(head_start_ray_commands=public))
    no_auth = [c.replace("RAY_AUTH_MODE=token ", "") for c in config["worker_start_ray_commands"]]
    assert "worker nodes must start" in problems(lambda c: c.update(
        worker_start_ray_commands=no_auth))  # fmt: skip
    own_sg = lambda c: c["available_node_types"]["gpu_1x"]["node_config"].update(  # noqa: E731
        SecurityGroupIds=["sg-1"]
    )
    assert "SecurityGroupIds" in problems(own_sg)
    no_iam = copy.deepcopy(config)
    del no_iam["available_node_types"]["gpu_8x"]["node_config"]["IamInstanceProfile"]
    assert "gpu_8x has no IamInstanceProfile" in " ".join(
        check_cluster_config(_filled(tmp_path, no_iam))
    )


def test_qgen_cluster_check_command(tmp_path, capsys):
    cli.main(["cluster-check", str(_filled(tmp_path))])
    assert "ok" in capsys.readouterr().out
    for path, why in ((CLUSTER_YAML, "replace line"), (tmp_path / "no.yaml", "no cluster config")):
        with pytest.raises(SystemExit) as exc:
            cli.main(["cluster-check", str(path)])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and err.count("\n") == 0 and why in err


def test_no_credentials_in_the_repository():
    assert scan_repo(REPO) == []
    text = (f"key = {FAKE_AWS_KEY_ID}\naws_secret_access_key={'A' * 40}\n"
            f"-----BEGIN RSA {'PRIVATE'} KEY-----\nRAY_AUTH_TOKEN={'ab' * 32}\n")  # fmt: skip
    assert [h.split(": ", 1)[1] for h in find_credentials(text)] == [
        "AWS access key id", "AWS secret access key", "private key", "Ray auth token"
    ]  # fmt: skip


class _RunsCode:
    """Unpickling this would create `path`: what a malicious checkpoint does."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_checkpoints_load_tensors_only(tmp_path):
    store = StudyStore(str(tmp_path / "study"))
    store.write_torch("ok.pt", {"w": torch.ones(3), "epoch": 2, "name": "x"})
    assert store.read_torch("ok.pt")["epoch"] == 2
    marker = tmp_path / "code-ran"
    store.write_torch("evil.pt", {"w": torch.ones(3), "payload": _RunsCode(marker)})
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only"):
        store.read_torch("evil.pt")
    assert not marker.exists()


def test_local_dashboard_is_private_unless_opted_in(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(DASHBOARD_HOST_ENV, raising=False)
    assert ray_init_kwargs(None)["dashboard_host"] == "127.0.0.1"
    monkeypatch.setenv(DASHBOARD_HOST_ENV, "0.0.0.0")
    assert ray_init_kwargs(None)["dashboard_host"] == "0.0.0.0"
    assert "dashboard_host" not in ray_init_kwargs("auto")  # a cluster's is set at ray start


# -- the job workflow on a real head ----------------------------------------------------
def _ray(head: LocalHead, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([head.ray_bin, *args], env=head.env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)  # fmt: skip


def _job_status(head: LocalHead, job: str) -> str:
    """The job's status from the job server's REST API (what `ray job status` reads)."""
    request = urllib.request.Request(
        f"{head.dashboard_url}/api/jobs/{job}",
        headers={"Authorization": f"Bearer {head.token_path.read_text()}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["status"]


@pytest.mark.slow
def test_study_runs_unchanged_as_a_ray_job(tmp_path):
    storage = tmp_path / "results"
    study = storage / "demo-smoke"
    qgen = str(Path(sys.executable).with_name("qgen"))
    head = LocalHead(num_cpus=2)
    head.env.update(AWS_ACCESS_KEY_ID=FAKE_AWS_KEY_ID, AWS_SECRET_ACCESS_KEY=FAKE_AWS_SECRET)
    with head:
        job = "qgen-test-demo"
        submit = _ray(head, "job", "submit", "--address", head.dashboard_url, "--no-wait",
                      "--submission-id", job, "--working-dir", str(REPO), "--",
                      sys.executable, "studies/demo.py", "--smoke", "--stages", "train",
                      "--storage", str(storage))  # fmt: skip
        assert submit.returncode == 0, submit.stderr[-2000:]
        in_flight = ""  # `qgen status` while the job runs, once trials have begun
        deadline = time.time() + 400
        while (status := _job_status(head, job)) in ("PENDING", "RUNNING"):
            assert time.time() < deadline, "the job did not finish"
            if not in_flight and (study / schema.STUDY_JSON).exists():
                out = subprocess.run([qgen, "status", str(study)], capture_output=True,
                                     text=True, timeout=60)  # fmt: skip
                assert out.returncode == 0, out.stderr
                if IN_FLIGHT.match(out.stdout) and _job_status(head, job) == "RUNNING":
                    in_flight = out.stdout
            time.sleep(1)
        logs = _ray(head, "job", "logs", job, "--address", head.dashboard_url).stdout
        assert status == "SUCCEEDED", logs[-3000:]
        assert in_flight, "`qgen status` never read the study's progress while the job ran"
        assert "done 4/4 (this run 4/4, failed 0, retried 0)" in logs  # the progress line
        with pytest.raises(urllib.error.HTTPError) as denied:  # token auth is on
            urllib.request.urlopen(f"{head.dashboard_url}/api/jobs/", timeout=10)
        assert denied.value.code == 401
        credentials = [head.token_path.read_text(), FAKE_AWS_SECRET, FAKE_AWS_KEY_ID]
        logged = [p for p in Path(head.temp_dir).glob("session_*/logs/**/*") if p.is_file()]
        assert any("job-driver" in p.name for p in logged)
        for path in [*logged, *study.rglob("*.json")]:
            text = path.read_text(errors="replace")
            assert not any(c in text for c in credentials), f"a credential is written in {path}"
        assert not any(c in logs for c in credentials)
    trials = pd.read_parquet(study / schema.TRIALS)
    assert sorted(trials["bits"]) == [2, 4, 8, 32] and (trials["status"] == "ok").all()
    assert "4/4 models done (ok 4" in cli.status(StudyStore(str(study)))
    assert len(list((study / "tune").rglob("events.out.tfevents*"))) >= 4  # TensorBoard
    assert head.pids() == []  # stopped: nothing of this instance is left

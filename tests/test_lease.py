"""The study folder's lease: two runs started at once against one store (two processes;
on a local disk and on S3) end with exactly one writer; a lease whose holder stopped
renewing it is taken over, a live one from another machine is not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pyarrow.fs as pafs
import pytest

from qgen_ray.errors import UserError
from qgen_ray.store import LEASE_S, LOCK, StudyStore
from tests.conftest import s3_env
from tests.support.fixtures import REPO

HOLD = """
import sys, time
from qgen_ray.errors import UserError
from qgen_ray.store import StudyStore
store = StudyStore(sys.argv[1])
try:
    with store.claimed("run " + sys.argv[2]):
        print("won", flush=True)
        time.sleep(4)
except UserError as err:
    print("refused:", err, flush=True)
"""


def _two_at_once(uri: str, env: dict) -> list[str]:
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, uri, str(i)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, text=True) for i in (1, 2)]  # fmt: skip
    return [p.communicate(timeout=120)[0].strip() for p in procs]


def test_two_runs_at_once_on_a_local_folder_leave_one_writer(tmp_path):
    outs = _two_at_once(str(tmp_path / "study"), dict(os.environ))
    assert sorted(o.split()[0] for o in outs) == ["refused:", "won"], outs
    assert not (tmp_path / "study" / LOCK).exists()  # the winner let go


def test_two_runs_at_once_on_s3_leave_one_writer(s3_endpoint):
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, allow_bucket_creation=True)
    fs.create_dir("leases")
    outs = _two_at_once("s3://leases/study", {**os.environ, **s3_env(s3_endpoint)})
    assert sorted(o.split()[0] for o in outs) == ["refused:", "won"], outs
    assert "another run is writing s3://leases/study" in " ".join(outs)


def _lease(store: StudyStore, host: str, age_s: float) -> None:
    renewed = datetime.now(timezone.utc) - timedelta(seconds=age_s)
    store.write_bytes(LOCK, json.dumps({"token": "x", "pid": 1, "host": host, "command": "c",
                                        "since": renewed.isoformat(),
                                        "renewed": renewed.isoformat()}).encode())  # fmt: skip


def test_a_lapsed_lease_is_taken_over_and_a_live_one_is_not(tmp_path):
    store = StudyStore(str(tmp_path / "study"))
    _lease(store, "another-machine", age_s=10)
    with pytest.raises(UserError, match="another run is writing"):
        with store.claimed("second"):
            pass
    _lease(store, "another-machine", age_s=LEASE_S + 5)  # its machine went away
    with store.claimed("after the crash"):
        assert json.loads(store.read_bytes(LOCK))["command"] == "after the crash"


def test_the_holder_renews_its_lease(tmp_path, monkeypatch):
    import time

    from qgen_ray import store as store_module

    monkeypatch.setattr(store_module, "LEASE_RENEW_S", 0.2)
    store = StudyStore(str(tmp_path / "study"))
    with store.claimed("long run"):
        first = json.loads(store.read_bytes(LOCK))
        time.sleep(1.5)
        later = json.loads(store.read_bytes(LOCK))
    assert later["token"] == first["token"] and later["renewed"] > first["renewed"]

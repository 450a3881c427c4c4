"""The result store: a study folder on a local disk or any pyarrow filesystem (s3://...).

Every write is atomic (written to a temporary name, then moved into place), so a crash
or a kill never leaves a half-written table or checkpoint behind, and a re-run finds
either the old file or the new one. Layout and columns: `qgen_ray.schema`.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from qgen_ray import schema
from qgen_ray.errors import DamagedFile, UserError, say_set_aside


def _resolve(uri: str) -> tuple[pafs.FileSystem, str, bool]:
    """(filesystem, path within it, is_local) for a folder path or a URI."""
    if "://" in uri and not uri.startswith("file://"):
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, OSError) as err:
            raise UserError(
                f"cannot open storage {uri!r} ({err}); pass a folder or a valid URI"
            ) from None
        return fs, path.rstrip("/"), False
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve()), True


LOCK = ".qgen.lock"  # the study folder's writer (StudyStore.claimed)
_CLAIMED: set[str] = set()  # study folders this process holds


LEASE_S = 120.0  # a lease not renewed for this long is taken over
LEASE_RENEW_S = 20.0  # how often the holder renews it
LEASE_SETTLE_S = 1.0  # object stores: wait before reading back whose write stayed


def _lease_lapsed(other: dict, host: str) -> bool:
    """Whether another run's lease may be taken over: not renewed for LEASE_S, or held by
    a process of this host that is gone."""
    try:
        renewed = datetime.fromisoformat(other.get("renewed") or other.get("since") or "")
    except ValueError:
        return True
    age = (datetime.now(timezone.utc) - renewed).total_seconds()
    if age > LEASE_S:
        return True
    return other.get("host") == host and not _pid_alive(other.get("pid"))


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


REQUEUED = (
    "the model is re-queued: a re-run of the study script trains it again "
    "(resuming from its last.pt when that is readable)"
)


class StudyStore:
    """One study's folder: `<storage>/<study>/`. Paths passed to methods are relative."""

    def __init__(self, uri: str):
        self.fs, self.root, self.is_local = _resolve(uri.rstrip("/"))
        # a local folder is kept absolute: Ray workers (Tune trials chdir to their own
        # folder) and job drivers rebuild the store from `uri` in another directory
        self.uri = self.root if self.is_local else uri.rstrip("/")

    @classmethod
    def for_study(cls, storage: str, study: str) -> StudyStore:
        return cls(f"{storage.rstrip('/')}/{study}")

    @property
    def name(self) -> str:
        return self.root.rstrip("/").rsplit("/", 1)[-1]

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    # -- raw bytes ---------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic write: a temporary sibling, then a move onto the final name. A failed
        write removes its temporary file; a full disk is one line (`UserError`)."""
        final = self.path(rel)
        parent = final.rsplit("/", 1)[0]
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{final.rsplit('/', 1)[-1]}"
        try:
            self.fs.create_dir(parent, recursive=True)
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            if self.is_local:
                os.replace(tmp, final)  # atomic on POSIX, also over an existing file
            else:
                self.fs.move(tmp, final)
        except OSError as err:
            try:
                self.fs.delete_file(tmp)
            except OSError:
                pass  # never created, or already moved
            if getattr(err, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or (
                "No space left" in str(err)
            ):
                raise UserError(
                    f"no space left on the device (or over a size quota) writing {final}: "
                    "free some space and re-run; finished results are kept"
                ) from None
            raise

    def set_aside(self, err: DamagedFile, consequence: str) -> str:
        """Keep a damaged file as `<name>.damaged` (never deleted) and say so in one line:
        which file, what is wrong, where it now is and what happens next."""
        target = f"{err.rel}.damaged"
        n = 1
        while self.exists(target):
            n += 1
            target = f"{err.rel}.damaged-{n}"
        if self.is_local:
            os.replace(self.path(err.rel), self.path(target))
        else:
            self.fs.move(self.path(err.rel), self.path(target))
        say_set_aside(self.path(err.rel), err, target.rsplit("/", 1)[-1], consequence)
        return target

    def delete(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_file(self.path(rel))

    def list_dir(self, rel: str) -> list[str]:
        """Names of the entries directly under `rel` (empty if it does not exist)."""
        if not self.exists(rel):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=False))
        return sorted(i.base_name for i in infos if not i.base_name.startswith("."))

    def check_writable(self) -> None:
        """Fail with one line before any work when the study folder cannot be written."""
        try:
            self.write_bytes(".write-probe", b"ok")
            self.delete(".write-probe")
        except OSError as err:
            raise UserError(
                f"cannot write to storage {self.uri} ({err.__class__.__name__}: "
                f"{str(err).splitlines()[0]}); make it writable, or pass --storage (a "
                "study script) or the study folder (qgen) in a writable place"
            ) from None

    @contextmanager
    def claimed(self, command: str):
        """Hold the study folder for one writing run: a lease (`.qgen.lock`: owner token,
        pid, host, command, since, renewed) that a second run beside it (another
        process, another machine on the same bucket) finds, stopping with one line
        instead of writing the same tables. The holder renews it every LEASE_RENEW_S; a
        lease not renewed for LEASE_S (its run crashed or its machine went), or one on
        this host whose process is gone, is taken over. Nested claims by the same process
        (a study script's stages) pass."""
        if self.root in _CLAIMED:
            yield
            return
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        me = {"token": uuid.uuid4().hex, "pid": os.getpid(), "host": socket.gethostname(),
              "command": command, "since": now, "renewed": now}  # fmt: skip
        while not self._create_lock(me):
            other = self.read_record(LOCK, "taken over") or {}
            if other and not _lease_lapsed(other, me["host"]):
                raise UserError(
                    f"another run is writing {self.uri}: `{other.get('command')}` (pid "
                    f"{other.get('pid')} on {other.get('host')} since {other.get('since')}); "
                    f"wait for it or stop it (its lease lapses {LEASE_S:.0f} s after it "
                    f"stops renewing; or delete {self.path(LOCK)})"
                )
            self.delete(LOCK)  # lapsed, its process is gone, or unreadable
        _CLAIMED.add(self.root)
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(me, stop), daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            _CLAIMED.discard(self.root)
            self.delete(LOCK)

    def _renew(self, me: dict, stop: threading.Event) -> None:
        while not stop.wait(LEASE_RENEW_S):
            try:
                me["renewed"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
                self.write_bytes(LOCK, json.dumps(me).encode())
            except (OSError, UserError):  # a missed renewal is retried; the lease outlasts it
                continue

    def _create_lock(self, me: dict) -> bool:
        """Create the lease if there is none: atomically on a local disk; on an object
        store (no exclusive create) written, then read back after a moment to see whose
        write stayed."""
        data = json.dumps(me).encode()
        if not self.is_local:
            if self.exists(LOCK):
                return False
            self.write_bytes(LOCK, data)
            time.sleep(LEASE_SETTLE_S)
            return (self.read_record(LOCK, "taken over") or {}).get("token") == me["token"]
        os.makedirs(self.root, exist_ok=True)
        try:
            fd = os.open(self.path(LOCK), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    # -- JSON, torch, Parquet -------------------------------------------------------------
    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def read_json(self, rel: str):
        """Raises `DamagedFile` when the file is there but is not JSON."""
        data = self.read_bytes(rel)
        try:
            return json.loads(data)
        except ValueError as err:
            raise DamagedFile(rel, err) from None

    def read_record(self, rel: str, consequence: str):
        """A JSON record, or None when it is missing or damaged (then set aside)."""
        if not self.exists(rel):
            return None
        try:
            return self.read_json(rel)
        except DamagedFile as err:
            self.set_aside(err, consequence)
            return None

    def write_torch(self, rel: str, obj) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        self.write_bytes(rel, buf.getvalue())

    def read_torch(self, rel: str, map_location="cpu"):
        """Load a checkpoint with `weights_only=True`: tensors and plain values only."""
        data = self.read_bytes(rel)
        try:
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except (EOFError, RuntimeError, pickle.UnpicklingError, ValueError) as err:
            if "Weights only load failed" in str(err):
                raise  # not damaged but refused: it holds more than tensors (never run)
            raise DamagedFile(rel, err) from None

    def write_table(self, rel: str, df: pd.DataFrame) -> None:
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
        self.write_bytes(rel, buf.getvalue())

    def read_table(self, rel: str) -> pd.DataFrame | None:
        """The table, or None when it is missing. A damaged table is set aside (kept as
        `<name>.damaged`) and read as missing: the stage that writes it recomputes its
        rows, and trials.parquet is rebuilt from the trial folders."""
        if not self.exists(rel):
            return None
        data = self.read_bytes(rel)
        try:
            return pq.read_table(io.BytesIO(data)).to_pandas()
        except (pa.ArrowException, ValueError) as err:
            self.set_aside(DamagedFile(rel, err), "read as missing: the stage that writes it "
                           "recomputes its rows (trials.parquet: rebuilt from the trial "
                           "folders)")  # fmt: skip
            return None

    def append_rows(self, rel: str, rows: pd.DataFrame, key: list[str]) -> pd.DataFrame:
        """Add rows to a table, replacing earlier rows with the same `key`; atomic."""
        old = self.read_table(rel)
        table = rows if old is None else pd.concat([old, rows], ignore_index=True)
        table = table.drop_duplicates(subset=key, keep="last").reset_index(drop=True)
        self.write_table(rel, table)
        return table

    # -- per-trial folders ----------------------------------------------------------------
    def trial(self, model_id: str) -> TrialStore:
        return TrialStore(self, model_id)

    def trial_ids(self) -> list[str]:
        return self.list_dir(schema.TRIALS_DIR)

    def results(self) -> list[dict]:
        """Every finished trial's result (its readable result.json), in model_id order."""
        return [r for r in (self.trial(mid).result() for mid in self.trial_ids()) if r]


class TrialStore:
    """`<study>/trials/<model_id>/`: checkpoints and the result of one model."""

    def __init__(self, study: StudyStore, model_id: str):
        self.study = study
        self.model_id = model_id
        self.prefix = f"{schema.TRIALS_DIR}/{model_id}"

    def rel(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def has(self, name: str) -> bool:
        return self.study.exists(self.rel(name))

    def save(self, name: str, obj) -> str:
        self.study.write_torch(self.rel(name), obj)
        return self.rel(name)

    def load(self, name: str, map_location="cpu"):
        return self.study.read_torch(self.rel(name), map_location)

    def has_result(self) -> bool:
        return self.has(schema.RESULT_JSON)

    def read_result(self) -> dict:
        return self.study.read_json(self.rel(schema.RESULT_JSON))

    def result(self) -> dict | None:
        """The model's result, or None when it has none yet or it is damaged (then set
        aside as result.json.damaged: the model is trained again by a re-run)."""
        return self.study.read_record(self.rel(schema.RESULT_JSON), REQUEUED)

    def missing_checkpoints(self) -> list[str]:
        """What an ok model needs downstream and lacks: init.pt, final.pt."""
        return [c for c in (schema.INIT_CKPT, schema.FINAL_CKPT) if not self.has(c)]

    def write_result(self, result: dict) -> None:
        self.study.write_json(self.rel(schema.RESULT_JSON), result)

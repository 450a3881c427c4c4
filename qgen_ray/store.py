"""The result store: a study folder on a local disk or any pyarrow filesystem (s3://...).

Every write is atomic (written to a temporary name, then moved into place), so a crash
or a kill never leaves a half-written table or checkpoint behind, and a re-run finds
either the old file or the new one. Layout and columns: `qgen_ray.schema`.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from qgen_ray import schema
from qgen_ray.errors import UserError


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
        """Atomic write: a temporary sibling, then a move onto the final name."""
        final = self.path(rel)
        parent = final.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{final.rsplit('/', 1)[-1]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        if self.is_local:
            os.replace(tmp, final)  # atomic on POSIX, also over an existing file
        else:
            self.fs.move(tmp, final)

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
                f"{str(err).splitlines()[0]}); pass --storage a writable folder or URI"
            ) from None

    # -- JSON, torch, Parquet -------------------------------------------------------------
    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def read_json(self, rel: str):
        return json.loads(self.read_bytes(rel))

    def write_torch(self, rel: str, obj) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        self.write_bytes(rel, buf.getvalue())

    def read_torch(self, rel: str, map_location="cpu"):
        """Load a checkpoint with `weights_only=True`: tensors and plain values only."""
        return torch.load(
            io.BytesIO(self.read_bytes(rel)), map_location=map_location, weights_only=True
        )

    def write_table(self, rel: str, df: pd.DataFrame) -> None:
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
        self.write_bytes(rel, buf.getvalue())

    def read_table(self, rel: str) -> pd.DataFrame | None:
        if not self.exists(rel):
            return None
        return pq.read_table(io.BytesIO(self.read_bytes(rel))).to_pandas()

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
        """Every finished trial's result (its result.json), in model_id order."""
        out = []
        for mid in self.trial_ids():
            t = self.trial(mid)
            if t.has_result():
                out.append(t.read_result())
        return out


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

    def write_result(self, result: dict) -> None:
        self.study.write_json(self.rel(schema.RESULT_JSON), result)

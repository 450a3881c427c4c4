"""Collect: per-trial result.json files -> trials.parquet, history.parquet, steps.parquet.

Idempotent and cheap; it also serves as the status check (`qgen status`): what is done,
diverged, failed, and what of the planned grid is still missing.

A study folder may hold the tables without every trial folder (the laptop workflow
syncs the tables and leaves `trials/` in the bucket): rows of models whose trial folder
is not here are kept as they are, never dropped, and those models count as trained.
"""

from __future__ import annotations

import pandas as pd

from qgen_ray import schema
from qgen_ray.store import StudyStore

# need no more training (a re-run retries only failed ones)
FINISHED = (
    schema.STATUS_OK,
    schema.STATUS_DIVERGED,
    schema.STATUS_DEGENERATE,
    schema.STATUS_STOPPED,
)


def _kept_rows(store: StudyStore, table: str, columns, folders: set[str]) -> pd.DataFrame:
    """The rows of an existing table whose model has no trial folder here."""
    old = store.read_table(table)
    if old is None or "model_id" not in old:
        return pd.DataFrame(columns=columns)
    return old[~old["model_id"].isin(folders)]


def collect(store: StudyStore) -> pd.DataFrame:
    """Rebuild the study's tables from its trial folders, keeping the rows of models whose
    folder is not here; return the trials table."""
    folders = set(store.trial_ids())
    results = store.results()
    kept = _kept_rows(store, schema.TRIALS, schema.TRIALS_COLUMNS, folders)
    if len(kept):
        print(f"[collect] kept {len(kept)} rows of models whose trial folders are not in "
              f"{store.uri}", flush=True)  # fmt: skip
    rows = [{k: v for k, v in r.items() if k not in ("history", "steps", "spec")} for r in results]
    trials = (
        pd.concat([pd.DataFrame(rows), kept], ignore_index=True)
        if len(kept)
        else pd.DataFrame(rows)
    )
    if trials.empty:
        trials = pd.DataFrame(columns=schema.TRIALS_COLUMNS)
    ordered = [c for c in schema.TRIALS_COLUMNS if c in trials] + [
        c for c in trials if c not in schema.TRIALS_COLUMNS
    ]
    trials = trials[ordered].sort_values("model_id").reset_index(drop=True)
    for table, columns, key in ((schema.HISTORY, schema.HISTORY_COLUMNS, "history"),
                                (schema.STEPS, schema.STEPS_COLUMNS, "steps")):  # fmt: skip
        fresh = pd.DataFrame([x for r in results for x in r.get(key, [])], columns=columns)
        old = _kept_rows(store, table, columns, folders)
        store.write_table(table, pd.concat([fresh, old], ignore_index=True) if len(old) else fresh)
    store.write_table(schema.TRIALS, trials)
    return trials


def table_only(store: StudyStore) -> pd.DataFrame:
    """Rows of trials.parquet whose model has no trial folder here (synced tables)."""
    return _kept_rows(store, schema.TRIALS, schema.TRIALS_COLUMNS, set(store.trial_ids()))


def finished_ids(store: StudyStore) -> set[str]:
    """Models that need no more training: ok (with init.pt and final.pt) or diverged, in
    their trial folder or, without one, in trials.parquet. An ok model whose checkpoint
    is missing is re-queued, and said so (a re-run rebuilds it from last.pt)."""
    done = set()
    for result in store.results():
        model_id, status = result["model_id"], result["status"]
        missing = store.trial(model_id).missing_checkpoints() if status == schema.STATUS_OK else []
        if missing:
            print(f"[{store.name}] model {model_id} is ok but has no {' or '.join(missing)}: "
                  "re-queued, the re-run rebuilds it", flush=True)  # fmt: skip
        elif status in FINISHED:
            done.add(model_id)
    rows = table_only(store)
    return done | set(rows.loc[rows["status"].isin(FINISHED), "model_id"])


def progress_counts(store: StudyStore, planned: list[str] | None = None) -> dict:
    """Counts by status from the store alone; `started` = a trial folder without a
    result yet; models known only from trials.parquet count by their row."""
    counts = {status: 0 for status in (*FINISHED, schema.STATUS_FAILED)} | {"started": 0}
    done = set()
    for mid in store.trial_ids():
        result = store.trial(mid).result()
        if result is not None:
            counts[result["status"]] += 1
            done.add(mid)
        else:
            counts["started"] += 1
    for mid, status in table_only(store)[["model_id", "status"]].itertuples(index=False):
        counts[status] = counts.get(status, 0) + 1
        done.add(mid)
    if planned is not None:
        counts["planned"] = len(planned)
        counts["pending"] = len([m for m in planned if m not in done])
    return counts

"""Collect: per-trial result.json files -> trials.parquet, history.parquet, steps.parquet.

Idempotent and cheap; it also serves as the status check (`qgen status`): what is done,
diverged, failed, and what of the planned grid is still missing.
"""

from __future__ import annotations

import pandas as pd

from qgen_ray import schema
from qgen_ray.store import StudyStore


def collect(store: StudyStore) -> pd.DataFrame:
    """Rewrite the study's tables from its trial folders; return the trials table."""
    results = store.results()
    trials = pd.DataFrame(
        [{k: v for k, v in r.items() if k not in ("history", "steps", "spec")} for r in results]
    )
    if trials.empty:
        trials = pd.DataFrame(columns=schema.TRIALS_COLUMNS)
    ordered = [c for c in schema.TRIALS_COLUMNS if c in trials] + [
        c for c in trials if c not in schema.TRIALS_COLUMNS
    ]
    trials = trials[ordered].sort_values("model_id").reset_index(drop=True)
    store.write_table(schema.TRIALS, trials)
    history = [h for r in results for h in r.get("history", [])]
    store.write_table(schema.HISTORY, pd.DataFrame(history, columns=schema.HISTORY_COLUMNS))
    steps = [s for r in results for s in r.get("steps", [])]
    store.write_table(schema.STEPS, pd.DataFrame(steps, columns=schema.STEPS_COLUMNS))
    return trials


def progress_counts(store: StudyStore, planned: list[str] | None = None) -> dict:
    """Counts by status from the store alone; `running` = started but no result yet."""
    counts = {schema.STATUS_OK: 0, schema.STATUS_DIVERGED: 0, schema.STATUS_FAILED: 0, "started": 0}
    done = set()
    for mid in store.trial_ids():
        t = store.trial(mid)
        if t.has_result():
            counts[t.read_result()["status"]] += 1
            done.add(mid)
        else:
            counts["started"] += 1
    if planned is not None:
        counts["planned"] = len(planned)
        counts["pending"] = len([m for m in planned if m not in done])
    return counts

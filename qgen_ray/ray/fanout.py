"""The follow-up Ray job: fan per-model work (measures, corruptions, landscapes) out over
the cluster through long-lived actors, and append the rows to a Parquet table.

Long-lived actors (an ActorPool) start CUDA and receive the dataset once. Actors are
restarted when their process dies and the task is retried (`ACTOR_RETRIES`), so a lost
worker loses nothing; finished rows are flushed to the table at least every `FLUSH_S`
seconds and at the end, so killing the job loses at most that much work, and a re-run
skips what the table already holds. The per-item work itself is plain, Ray-free code in
`qgen_ray.pipeline.jobs`.
"""

from __future__ import annotations

import time

import pandas as pd
import ray
from ray.util import ActorPool

from qgen_ray.data.base import ImageData
from qgen_ray.ray.session import check_request
from qgen_ray.store import StudyStore

ACTOR_RETRIES = 3  # restarts of a dead worker actor, and retries of its task
FLUSH_S = 5.0  # seconds between table writes while results arrive


@ray.remote(max_restarts=ACTOR_RETRIES, max_task_retries=ACTOR_RETRIES)
class FanOutWorker:
    """Holds the dataset (None for jobs reading from disk) and the store; runs one
    `qgen_ray.pipeline.jobs` job per call."""

    def __init__(self, store_uri: str, data_ref: list, device: str, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.store = StudyStore(store_uri)
        # The dataset comes as [ObjectRef] (not a bare ref) so a restarted actor fetches
        # it again from the object store instead of depending on a constructor argument.
        self.data: ImageData | None = ray.get(data_ref[0])
        self.device = device

    def run(self, job: str, item: dict, kwargs: dict) -> tuple[dict, list[dict], str]:
        from qgen_ray.pipeline.jobs import JOBS

        try:
            rows = JOBS.get(job)(self.store, self.data, item, self.device, **kwargs)
            return item, rows, ""
        except Exception as err:  # noqa: BLE001 - reported by the driver, retried on re-run
            return item, [], f"{err.__class__.__name__}: {err}"


def pool_size(n_items: int, cpus: float, gpus: float) -> int:
    """As many actors as the cluster's free resources allow, at most one per item."""
    free = ray.available_resources()
    fits = int(free.get("CPU", 1) // cpus) if cpus else n_items
    if gpus:
        fits = min(fits, int(free.get("GPU", 0) // gpus))
    return max(1, min(n_items, fits))


def fan_out(
    store: StudyStore,
    job: str,
    items: list[dict],
    data: ImageData | None,
    *,
    table: str | None,
    key: list[str],
    kwargs: dict | None = None,
    cpus: float = 1.0,
    gpus: float = 0.0,
    device: str = "auto",
    label: str | None = None,
) -> tuple[pd.DataFrame | None, list[str]]:
    """Run `job` on every item; append rows to `table` (keyed by `key`).

    Returns (the table after the run, error lines of items that raised).
    """
    from tqdm import tqdm

    check_request(cpus, gpus, "--cpus-per-task / --gpus-per-task (a study's --gpus-per-trial)")

    errors: list[str] = []
    if not items:
        return (store.read_table(table) if table else None), errors
    data_ref = ray.put(data)
    actors = [
        FanOutWorker.options(num_cpus=cpus, num_gpus=gpus).remote(
            store.uri, [data_ref], device, int(max(1, cpus))
        )
        for _ in range(pool_size(len(items), cpus, gpus))
    ]
    pool = ActorPool(actors)
    buffer: list[dict] = []
    last_flush = time.time()
    result = None

    def flush() -> None:
        nonlocal buffer, last_flush, result
        if table and buffer:
            result = store.append_rows(table, pd.DataFrame(buffer), key)
        buffer, last_flush = [], time.time()

    bar = tqdm(total=len(items), desc=label or job, unit="item", mininterval=2.0)
    try:
        for item, rows, error in pool.map_unordered(
            lambda actor, it: actor.run.remote(job, it, kwargs or {}), items
        ):
            if error:
                errors.append(f"{item}: {error}")
            buffer.extend(rows)
            bar.update(1)
            if time.time() - last_flush > FLUSH_S:
                flush()
    finally:
        flush()  # whatever finished is kept, also on Ctrl-C
        bar.close()
        for actor in actors:
            ray.kill(actor)
    if table and result is None:
        result = store.read_table(table)
    return result, errors

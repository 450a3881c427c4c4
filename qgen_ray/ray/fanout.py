"""The follow-up Ray job: fan per-model work (measures, corruptions, landscapes) out over
the cluster through long-lived actors, and append the rows to a Parquet table.

Long-lived actors start CUDA and receive the dataset once. The pool follows the cluster
(`ElasticPool`): it asks the autoscaler for the workers it could use, grows as nodes join
and shrinks as they leave or as the work runs out; an item whose worker died goes to
another (`ACTOR_RETRIES`), so a lost node loses nothing. Finished rows are flushed to the
table at least every `FLUSH_S` seconds and at the end, so killing the job loses at most
that much work, and a re-run skips what the table already holds. The per-item work itself
is plain, Ray-free code in `qgen_ray.pipeline.jobs`.
"""

from __future__ import annotations

import time

import pandas as pd
import ray
from ray.autoscaler.sdk import request_resources

from qgen_ray.data.base import ImageData
from qgen_ray.ray.session import check_request
from qgen_ray.store import StudyStore

ACTOR_RETRIES = 3  # an item whose worker died is handed to another this many times
FLUSH_S = 5.0  # seconds between table writes while results arrive
POLL_S = 1.0  # seconds between looks at the cluster for room for another worker
ASK_AGAIN_S = 30.0  # seconds after which the autoscaler is asked again (another job may ask)


@ray.remote
class FanOutWorker:
    """Holds the dataset (None for jobs reading from disk) and the store; runs one
    `qgen_ray.pipeline.jobs` job per call. Not restarted when its node goes: the driver
    hands its item to another worker and the pool shrinks."""

    def __init__(self, store_uri: str, data_ref: list, device: str, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.store = StudyStore(store_uri)
        # The dataset comes as [ObjectRef] (not a bare ref) so the worker fetches it from
        # the object store on whichever node it starts.
        self.data: ImageData | None = ray.get(data_ref[0])
        self.device = device

    def ready(self) -> str:
        """The worker's node, once it holds the dataset."""
        return ray.get_runtime_context().get_node_id()

    def run(self, job: str, item: dict, kwargs: dict) -> tuple[dict, list[dict], str]:
        from qgen_ray.pipeline.jobs import JOBS

        try:
            rows = JOBS.get(job)(self.store, self.data, item, self.device, **kwargs)
            return item, rows, ""
        except Exception as err:  # noqa: BLE001 - reported by the driver, retried on re-run
            return item, [], f"{err.__class__.__name__}: {err}"


def room_for(cpus: float, gpus: float, claimed: dict[str, float]) -> int:
    """How many more workers the cluster's free resources hold now, less what workers
    still starting have `claimed`."""
    free = ray.available_resources()
    cpu = free.get("CPU", 0.0) - claimed.get("CPU", 0.0)
    gpu = free.get("GPU", 0.0) - claimed.get("GPU", 0.0)
    fits = int(cpu // cpus + 1e-9) if cpus else 10**6
    if gpus:
        fits = min(fits, int(gpu // gpus + 1e-9))
    return max(0, fits)


class ElasticPool:
    """Workers that follow the cluster. It asks the autoscaler for one worker's resources
    per item left (`ray.autoscaler.sdk.request_resources`: nodes are launched for them),
    starts a worker whenever a node has room, hands items to ready workers, and lets a
    worker go as soon as no item is left for it (so idle nodes can be removed). A worker
    lost with its node costs nothing but time: its item goes back to the queue (at most
    ACTOR_RETRIES times) and the pool shrinks. Pool sizes over time are kept in `sizes`
    ((seconds since start, ready workers)) and printed as they change."""

    def __init__(self, store: StudyStore, data: ImageData | None, job: str, kwargs: dict,
                 cpus: float, gpus: float, device: str, label: str):  # fmt: skip
        self.store, self.job, self.kwargs, self.label = store, job, kwargs, label
        self.cpus, self.gpus, self.device = cpus, gpus, device
        self.data_ref = [ray.put(data)]
        self.starting: dict = {}  # ready() ref -> worker
        self.idle: list = []
        self.busy: dict = {}  # run() ref -> (worker, item)
        self.start = time.time()
        self.sizes: list[tuple[float, int]] = []
        self.asked = (-1, 0.0)  # (workers, when) last asked of the autoscaler

    def _ask(self, workers: int) -> None:
        """Ask the autoscaler for `workers` workers' resources when that changes, and
        again every ASK_AGAIN_S: the request is one for the whole cluster, which another
        job's request (or its end) replaces."""
        if workers == self.asked[0] and time.time() - self.asked[1] < ASK_AGAIN_S:
            return
        bundle = {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}
        request_resources(bundles=[bundle] * workers)
        self.asked = (workers, time.time())

    def _grow(self, wanted: int) -> None:
        claimed = {"CPU": self.cpus * len(self.starting), "GPU": self.gpus * len(self.starting)}
        room = room_for(self.cpus, self.gpus, claimed)
        for _ in range(min(room, wanted - len(self.starting) - len(self.idle) - len(self.busy))):
            worker = FanOutWorker.options(num_cpus=self.cpus, num_gpus=self.gpus).remote(
                self.store.uri, self.data_ref, self.device, int(max(1, self.cpus))
            )
            self.starting[worker.ready.remote()] = worker

    def _record(self) -> None:
        size = len(self.idle) + len(self.busy)
        if not self.sizes or self.sizes[-1][1] != size:
            self.sizes.append((round(time.time() - self.start, 1), size))
            print(f"[{self.label}] workers: {size}", flush=True)

    def run(self, items: list[dict]):
        """Yield (item, rows, error) as items finish, in any order."""
        queue, tries = list(items), {}
        try:
            while queue or self.busy:
                self._ask(len(queue) + len(self.busy))
                self._grow(len(queue) + len(self.busy))
                while self.idle and queue:
                    worker, item = self.idle.pop(), queue.pop(0)
                    self.busy[worker.run.remote(self.job, item, self.kwargs)] = (worker, item)
                for worker in self.idle:  # nothing left for it: free its node
                    ray.kill(worker)
                self.idle = []
                self._record()
                refs = [*self.starting, *self.busy]
                done, _ = ray.wait(refs, num_returns=1, timeout=POLL_S) if refs else ([], [])
                for ref in done:
                    if ref in self.starting:
                        worker = self.starting.pop(ref)
                        try:
                            ray.get(ref)
                            self.idle.append(worker)
                        except ray.exceptions.RayError:  # its node went while it started
                            pass
                        continue
                    worker, item = self.busy.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayActorError as err:  # the worker (its node) died
                        key = id(item)
                        tries[key] = tries.get(key, 0) + 1
                        if tries[key] > ACTOR_RETRIES:
                            yield item, [], f"worker lost {tries[key]} times: {err}"
                        else:
                            print(f"[{self.label}] a worker was lost; its item goes to "
                                  "another", flush=True)  # fmt: skip
                            queue.append(item)
                        continue
                    self.idle.append(worker)
                    yield result
        finally:
            request_resources(bundles=[])  # let the autoscaler remove idle nodes
            for worker in [*self.starting.values(), *self.idle]:
                ray.kill(worker)
            for worker, _ in self.busy.values():
                ray.kill(worker)
            self.starting, self.idle, self.busy = {}, [], {}
            self._record()


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
    pool = ElasticPool(store, data, job, kwargs or {}, cpus, gpus, device, label or job)
    buffer: list[dict] = []
    last_flush = time.time()
    result = None

    def flush() -> None:
        nonlocal buffer, last_flush, result
        if table and buffer:
            result = store.append_rows(table, pd.DataFrame(buffer), key)
        buffer, last_flush = [], time.time()

    bar = tqdm(total=len(items), desc=label or job, unit="item", mininterval=2.0)
    results = pool.run(items)
    try:
        for item, rows, error in results:
            if error:
                errors.append(f"{item}: {error}")
            buffer.extend(rows)
            bar.update(1)
            if time.time() - last_flush > FLUSH_S:
                flush()
    finally:
        results.close()  # the workers go and the request is withdrawn now, not at gc
        flush()  # whatever finished is kept, also on Ctrl-C
        bar.close()
    if table and result is None:
        result = store.read_table(table)
    return result, errors

"""Connecting to Ray: a local instance by default, any cluster by address, and keeping
cloud keys out of the logs Ray writes."""

from __future__ import annotations

import os
import socket

import ray

from qgen_ray.errors import UserError

DASHBOARD_HOST_ENV = "QGEN_DASHBOARD_HOST"  # opt-in host for a local Ray's dashboard


def ray_init_kwargs(address: str | None) -> dict:
    """`ray.init` arguments. A new local instance binds its dashboard to 127.0.0.1 unless
    the user opts in with QGEN_DASHBOARD_HOST (e.g. 0.0.0.0 on a trusted network)."""
    kwargs = {"logging_level": "WARNING", "configure_logging": True}
    if address is None and "RAY_ADDRESS" not in os.environ:
        kwargs["dashboard_host"] = os.environ.get(DASHBOARD_HOST_ENV) or "127.0.0.1"
    return kwargs


# Ray Tune copies these from the driver's environment into every trial actor's runtime
# env (ray/tune/execution/class_cache.py), and Ray's runtime-env agent logs runtime envs
# verbatim (runtime_env_agent.log): the keys would be written into the cluster's logs.
# Workers get credentials from their own environment or IAM instance profile instead.
CLOUD_KEYS_NOT_PROPAGATED = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN",
)  # fmt: skip


def keep_cloud_keys_out_of_logs() -> None:
    """Stop Ray Tune from copying cloud keys into trial runtime envs (and so into logs)."""
    from ray.tune.execution import class_cache

    propagated = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(propagated, set):
        propagated.difference_update(CLOUD_KEYS_NOT_PROPAGATED)


CONNECT_TIMEOUT_S = 10.0  # a cluster address that does not answer within this is an error
# Where `ray up` puts the autoscaler's config on the head node: its node types say what
# the cluster can grow to.
AUTOSCALER_CONFIG = "~/ray_bootstrap_config.yaml"


def _check_reachable(address: str) -> None:
    """One line, within CONNECT_TIMEOUT_S, when nothing listens at HOST:PORT (Ray itself
    would retry for minutes)."""
    host_port = address.removeprefix("ray://")
    if ":" not in host_port:
        return
    host, port = host_port.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as err:
        raise UserError(
            f"no Ray cluster answers at {address} ({err.__class__.__name__}: {err}); "
            "start one (ray start --head / ray up cluster.yaml) or leave out --address "
            "for a local Ray"
        ) from None


def init_ray(address: str | None) -> None:
    """Connect to `address` (a cluster; "auto" on a head node); otherwise start a local
    instance (inside `ray job submit`, Ray's own RAY_ADDRESS makes this connect)."""
    keep_cloud_keys_out_of_logs()
    if ray.is_initialized():
        return
    if address and address != "auto":
        _check_reachable(address)
    try:
        ray.init(address=address, **ray_init_kwargs(address))
    except ConnectionError as err:
        raise UserError(
            f"cannot connect to a Ray cluster at {address!r} ({str(err).splitlines()[0]}); "
            "start one (ray start --head / ray up cluster.yaml) or leave out --address "
            "for a local Ray"
        ) from None


def cluster_gpus() -> float:
    """GPUs the connected Ray cluster has in all (0.0 without any)."""
    return float(ray.cluster_resources().get("GPU", 0.0))


def node_type_resources() -> list[dict]:
    """What each node type the autoscaler may launch provides: a request any of them can
    hold is one the cluster can grow to. The config is the one the cluster's autoscaler
    (its `monitor.py` process on the head node, where a job's driver runs) was started
    with, else a `ray up` head's bootstrap file; empty for a cluster that cannot grow."""
    path = _monitor_config() or os.path.expanduser(AUTOSCALER_CONFIG)
    if not os.path.isfile(path):
        return []
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f) or {}  # YAML, or the JSON `ray start` also accepts
    types = config.get("available_node_types") or {}
    return [dict(t.get("resources") or {}) for t in types.values()]


def _monitor_config() -> str | None:
    """`--autoscaling-config` of this cluster's autoscaler monitor, when it runs on this
    machine (Linux /proc; matched by the GCS address)."""
    if not os.path.isdir("/proc") or not ray.is_initialized():
        return None
    gcs = ray.get_runtime_context().gcs_address
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith("autoscaler/_private/monitor.py") for a in args):
            continue
        if f"--gcs-address={gcs}" not in args:
            continue
        for a in args:
            if a.startswith("--autoscaling-config="):
                return a.split("=", 1)[1]
    return None


def check_request(cpus: float, gpus: float, what: str) -> None:
    """One line, before anything is submitted, for a task that no live node and no node
    type of the autoscaler can hold (Ray would wait for it forever). `what` names the
    flags, e.g. "--cpus-per-trial / --gpus-per-trial"."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    candidates = nodes + node_type_resources()
    if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in candidates):
        return
    biggest = max(candidates, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    raise UserError(
        f"{what} ask for {cpus:g} CPUs and {gpus:g} GPUs per task, but no node of this Ray "
        f"cluster can hold that (the largest has {biggest.get('CPU', 0):g} CPUs and "
        f"{biggest.get('GPU', 0):g} GPUs); lower the request"
        + (" (on a machine without GPUs: 0 GPUs, --device cpu)" if gpus else "")
    )

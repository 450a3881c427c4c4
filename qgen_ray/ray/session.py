"""Connecting to Ray: a local instance by default, any cluster by address, and keeping
cloud keys out of the logs Ray writes."""

from __future__ import annotations

import os

import ray

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


def init_ray(address: str | None) -> None:
    """Connect to `address` (a cluster; "auto" on a head node); otherwise start a local
    instance (inside `ray job submit`, Ray's own RAY_ADDRESS makes this connect)."""
    keep_cloud_keys_out_of_logs()
    if ray.is_initialized():
        return
    ray.init(address=address, **ray_init_kwargs(address))


def cluster_gpus() -> float:
    """GPUs the connected Ray cluster has in all (0.0 without any)."""
    return float(ray.cluster_resources().get("GPU", 0.0))

"""Running on a cluster: check a `ray up` config offline and find credentials in text.

    check_cluster_config(path)   Ray's own schema check + our security rules -> problems
    cluster_check(path)          the same for `qgen cluster-check`: ok line or UserError
    placeholders(text)           values still to fill in before `ray up` (`<...>`)
    find_credentials(text)       AWS keys, private keys, Ray tokens written into text

The security rules (README "Run on a cluster"): the security group opens only SSH to the
world (Ray's default rules are SSH from anywhere plus all traffic inside the cluster; a
config may only add rules for narrower sources), the dashboard binds to 127.0.0.1 (reach
it with `ray dashboard cluster.yaml`, an SSH port-forward), every node starts with
`RAY_AUTH_MODE=token`, and no credentials are written into the repository.
"""

from __future__ import annotations

import copy
import logging
import re
import shlex
from pathlib import Path

from qgen_ray.errors import UserError

SSH_PORT = 22
WORLD_CIDRS = ("0.0.0.0/0", "::/0")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
PLACEHOLDER = re.compile(r"<[A-Za-z][^<>\n]*>")  # `<...>` values the user must replace

# Patterns of secrets that must never be committed or logged.
CREDENTIAL_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(
        r"(?i)aws_?secret_?access_?key\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{40}\b"
    ),
    "private key": re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----"),
    "Ray auth token": re.compile(r"(?i)ray_auth_token\s*[:=]\s*['\"]?[0-9a-f]{64}\b"),
}


# -- cluster.yaml -----------------------------------------------------------------------
def load_cluster_config(path: str | Path) -> dict:
    """The YAML file as a dict; a missing or malformed file is one clear line."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"no cluster config at {path}; pass the path of cluster.yaml")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a cluster config (a YAML mapping)")
    return config


def ray_schema_problems(config: dict) -> list[str]:
    """Ray's own offline validation (`ray up` runs the same before any cloud call):
    defaults filled in from Ray's AWS defaults, then the JSON schema and its checks."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # no "setting max workers"
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "top level"
        return [f"Ray's cluster schema rejects {where}: {err.message}"]
    except (ValueError, KeyError, RuntimeError) as err:
        return [f"Ray's cluster config check failed: {err}"]
    return []


def world_open_rules(config: dict) -> list[str]:
    """Inbound rules open to the whole internet other than SSH, from the security group
    rules the config adds to Ray's defaults (`provider.security_group.IpPermissions`)."""
    rules = config.get("provider", {}).get("security_group", {}).get("IpPermissions", []) or []
    out = []
    for rule in rules:
        cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        cidrs += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        if not any(c in WORLD_CIDRS for c in cidrs):
            continue
        ports = (rule.get("FromPort"), rule.get("ToPort"))
        if rule.get("IpProtocol") == "tcp" and ports == (SSH_PORT, SSH_PORT):
            continue
        out.append(f"{rule.get('IpProtocol')} ports {ports[0]}-{ports[1]} open to the world")
    return out


def _start_commands(config: dict, which: str) -> list[str]:
    return [str(c) for c in config.get(f"{which}_start_ray_commands", []) or []]


def _flag_values(command: str, flag: str) -> list[str]:
    """Values of `--flag=value` / `--flag value` in a shell command line."""
    words = shlex.split(command.replace(";", " ; "))
    out = []
    for i, word in enumerate(words):
        if word.startswith(f"{flag}="):
            out.append(word.split("=", 1)[1])
        elif word == flag and i + 1 < len(words):
            out.append(words[i + 1])
    return out


def security_problems(config: dict) -> list[str]:
    """Our security rules, checked on the config as written (see the module docstring)."""
    problems = world_open_rules(config)
    for name, node_type in (config.get("available_node_types") or {}).items():
        if "SecurityGroupIds" in (node_type.get("node_config") or {}):
            problems.append(
                f"node type {name} names its own SecurityGroupIds: their rules cannot be "
                "checked here; use provider.security_group instead"
            )
    for command in _start_commands(config, "head"):
        for host in _flag_values(command, "--dashboard-host"):
            if host not in LOOPBACK_HOSTS:
                problems.append(
                    f"the head's dashboard binds to {host}: use --dashboard-host=127.0.0.1 "
                    "and `ray dashboard cluster.yaml` (an SSH port-forward)"
                )
    for which in ("head", "worker"):
        starts = [c for c in _start_commands(config, which) if "ray start" in c]
        if not starts or not all("RAY_AUTH_MODE=token" in c for c in starts):
            problems.append(f"{which} nodes must start Ray with RAY_AUTH_MODE=token")
    return problems


def check_cluster_config(path: str | Path) -> list[str]:
    """Every problem of a cluster config: Ray's schema, our security rules, credentials
    written into it, worker types without an IAM instance profile (results go to S3)."""
    config = load_cluster_config(path)
    problems = ray_schema_problems(config) + security_problems(config)
    problems += [f"{path}: {hit}" for hit in find_credentials(Path(path).read_text())]
    head = config.get("head_node_type")
    for name, node_type in (config.get("available_node_types") or {}).items():
        if name != head and "IamInstanceProfile" not in (node_type.get("node_config") or {}):
            problems.append(
                f"worker type {name} has no IamInstanceProfile: its trials cannot write "
                "results to S3"
            )
    return problems


def cluster_check(path: str | Path) -> str:
    """`qgen cluster-check`: one line if the config is ready for `ray up`, else a
    UserError listing every problem and every value still to fill in."""
    problems = check_cluster_config(path)
    todo = placeholders(Path(path).read_text())
    if problems or todo:
        parts = problems + [f"replace {t}" for t in todo]
        raise UserError(f"{path}: {len(parts)} problem(s): " + "; ".join(parts))
    return f"{path}: ok (Ray's cluster schema, security rules, no credentials)"


def placeholders(text: str) -> list[str]:
    """`line N: <value>` for every `<...>` value still to replace (comments ignored)."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0]
        out += [f"line {number}: {m}" for m in PLACEHOLDER.findall(code)]
    return out


# -- credentials ------------------------------------------------------------------------
def find_credentials(text: str) -> list[str]:
    """`line N: <kind>` for each secret-looking string in `text` (the secret not shown)."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        out += [
            f"line {number}: {kind}" for kind, p in CREDENTIAL_PATTERNS.items() if p.search(line)
        ]
    return out

"""Running on a cluster: check a `ray up` config offline, find credentials in text, and
run a one-machine Ray head for the job workflow (`ray job submit`) without a cloud.

    check_cluster_config(path)   Ray's own schema check + our security rules -> problems
    cluster_check(path)          the same for `qgen cluster-check`: ok line or UserError
    placeholders(text)           values still to fill in before `ray up` (`<...>`)
    find_credentials(text)       AWS keys, private keys, Ray tokens written into text
    scan_repo(root)              find_credentials over the repository's text files
    LocalHead                    `ray start --head` on free ports, token auth, private
                                 dashboard; `stop()` ends exactly its own processes

The security rules (README "Run on a cluster"): the security group opens only SSH to the
world (Ray's default rules are SSH from anywhere plus all traffic inside the cluster; a
config may only add rules for narrower sources), the dashboard binds to 127.0.0.1 (reach
it with `ray dashboard cluster.yaml`, an SSH port-forward), every node starts with
`RAY_AUTH_MODE=token`, and no credentials are written into the repository.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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


def uncommented_keys(text: str, keys: list[str]) -> list[str]:
    """Keys among `keys` whose line has no comment on it or directly above it."""
    lines = text.splitlines()
    missing = []
    for key in keys:
        pattern = re.compile(rf"^\s*(- )?{re.escape(key)}:")
        hits = [i for i, line in enumerate(lines) if pattern.match(line)]
        if not hits:
            missing.append(f"{key} (not found)")
        for i in hits:
            above = lines[i - 1].strip() if i else ""
            if "#" not in lines[i] and not above.startswith("#"):
                missing.append(f"{key} (line {i + 1})")
    return missing


# -- credentials ------------------------------------------------------------------------
def find_credentials(text: str) -> list[str]:
    """`line N: <kind>` for each secret-looking string in `text` (the secret not shown)."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        out += [
            f"line {number}: {kind}" for kind, p in CREDENTIAL_PATTERNS.items() if p.search(line)
        ]
    return out


def repo_text_files(root: str | Path) -> list[Path]:
    """The repository's tracked and not-ignored files that are text (git decides which)."""
    root = Path(root)
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    files = []
    for name in filter(None, listed):
        path = root / name
        if path.is_file() and b"\0" not in path.read_bytes()[:8192]:
            files.append(path)
    return files


def scan_repo(root: str | Path) -> list[str]:
    """`path: line N: <kind>` for each credential-looking string in the repository."""
    root = Path(root)
    return [
        f"{path.relative_to(root)}: {hit}"
        for path in repo_text_files(root)
        for hit in find_credentials(path.read_text(errors="replace"))
    ]


# -- a one-machine Ray head -------------------------------------------------------------
# every port `ray start --head` listens on, so that two heads on one machine never collide
HEAD_PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
)


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports: every socket stays bound until all are chosen, so the
    OS cannot hand the same port out twice (it does, if each is closed at once)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can read (Linux /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        table[int(entry.name)] = (ppid, cmdline)
    return table


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class LocalHead:
    """A Ray head on this machine, started like a cluster's: `ray start --head`, every
    port chosen free, its own temp dir (so `ray.init()` elsewhere never finds it), token
    auth with its own token file, the dashboard on 127.0.0.1.

    `env` is what a client (`ray job submit`, a study script with `--address`) needs.
    `stop()` ends exactly this instance's processes; never `ray stop`, which stops every
    Ray instance of the user on the machine. Linux only (reads /proc).
    """

    def __init__(self, num_cpus: int = 2, ray_bin: str | None = None):
        self.num_cpus = num_cpus
        self.ray_bin = ray_bin or str(Path(sys.executable).with_name("ray"))
        # short: Ray's socket paths under the temp dir must stay < 108 characters
        self.temp_dir = tempfile.mkdtemp(prefix="qgr-", dir="/tmp")
        self.token_path = Path(self.temp_dir) / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.ports = dict(zip(HEAD_PORT_FLAGS, free_ports(len(HEAD_PORT_FLAGS))))
        self.port, self.dashboard_port = self.ports["--port"], self.ports["--dashboard-port"]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        self.env.pop("RAY_ADDRESS", None)
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))

    @property
    def address(self) -> str:
        """The GCS address, for `--address` of a study script."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard / job server, for `ray job submit --address`."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout: float = 180) -> LocalHead:
        cmd = [
            self.ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(self.num_cpus), "--num-gpus", "0", "--temp-dir", self.temp_dir,
            "--dashboard-host", "127.0.0.1", "--min-worker-port", "0", "--max-worker-port", "0",
            "--disable-usage-stats", *[str(x) for kv in self.ports.items() for x in kv],
        ]  # fmt: skip
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        return self

    def pids(self, title: str | None = None) -> list[int]:
        """This instance's processes: those naming its temp dir or GCS port, and all
        their descendants (workers, job drivers). `title`: only those whose command line
        starts with it (e.g. "ray::ImplicitFunc", a Tune trial)."""
        table = _proc_table()
        mine = {
            pid for pid, (_, cmd) in table.items()
            if self.temp_dir in cmd or re.search(rf"--address=\S+:{self.port}\b", cmd)
        }  # fmt: skip
        grew = True
        while grew:
            more = {pid for pid, (ppid, _) in table.items() if ppid in mine} - mine
            mine |= more
            grew = bool(more)
        mine.discard(os.getpid())
        return sorted(p for p in mine if title is None or table[p][1].startswith(title))

    def stop(self, grace: float = 2) -> None:
        """SIGTERM this instance's processes, SIGKILL whatever is left after `grace` s
        (the set is taken before any dies: an orphaned worker is still found), then
        delete its temp dir."""
        pids = set(self.pids())
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = {p for p in pids | set(self.pids()) if pid_alive(p)}
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + grace
            while pids and time.time() < deadline:
                time.sleep(0.2)
                pids = {p for p in pids if pid_alive(p)}
            if not pids:
                break
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # its logs, sockets and token

    def __enter__(self) -> LocalHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

"""Test machinery for cluster behaviour: a one-machine Ray head for the job workflow
(`ray job submit`) without a cloud, process checks, and the repository credential scan.

    FakeCluster        a multi-node cluster with the real autoscaler and fake nodes
    LocalHead          `ray start --head` on free ports, token auth, private dashboard;
                       `stop()` ends exactly its own processes
    free_ports(n)      n free TCP ports on 127.0.0.1
    pid_alive(pid)     a live (not zombie) process
    scan_repo(root)    find_credentials over the repository's text files
    uncommented_keys   keys of a YAML text without a comment on or above their line
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qgen_ray.ray.cluster_config import find_credentials


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


class FakeCluster:
    """A multi-node Ray cluster on this machine with Ray's real autoscaler: the
    `fake_multinode` provider launches and removes worker raylets as local processes with
    the resources declared per node type (fake GPUs included). Started as
    ../shared/checks/fake_autoscaling_cluster.sh shows (`ray start --head --block` in its
    own session; `ray.cluster_utils.AutoscalingCluster` is broken in the wheel); stopped
    by its process group, never `ray stop`.

    `worker_types`: name -> {"resources": {...}, "min_workers": n, "max_workers": m}.
    The head gets its own temp dir, so a later `ray.init()` on this machine never finds
    (and tries to join) it, as it would through /tmp/ray/ray_current_cluster.
    """

    def __init__(self, head_cpus: int, worker_types: dict, idle_timeout_s: float = 6,
                 dashboard: bool = False, env: dict | None = None):  # fmt: skip
        self.head_cpus, self.worker_types, self.dashboard = head_cpus, worker_types, dashboard
        self.temp_dir = tempfile.mkdtemp(prefix="qgf-", dir="/tmp")
        self.port, self.dashboard_port = free_ports(2)
        self.config = Path(self.temp_dir) / "autoscaler.json"
        most = sum(t["max_workers"] for t in worker_types.values())
        self.config.write_text(json.dumps({
            "cluster_name": "fake", "max_workers": most,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True,
                         "gcs_address": f"{_node_ip()}:{self.port}"},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {},
                                     "max_workers": 0},
                **{name: {"node_config": {}, "min_workers": 0, **t}
                   for name, t in worker_types.items()},
            },
            "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
            "idle_timeout_minutes": idle_timeout_s / 60, "docker": {},
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        }))  # fmt: skip
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        self.env.pop("RAY_ADDRESS", None)
        self.env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
                        RAY_AUTH_MODE="disabled", **(env or {}))  # fmt: skip
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{_node_ip()}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """The job server (`dashboard=True`), for `ray job submit --address`."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout: float = 120) -> FakeCluster:
        ray_bin = str(Path(sys.executable).with_name("ray"))
        self.log = open(Path(self.temp_dir) / "head.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", f"--port={self.port}",
             f"--num-cpus={self.head_cpus}", "--num-gpus=0", f"--temp-dir={self.temp_dir}",
             f"--autoscaling-config={self.config}", "--disable-usage-stats",
             *(["--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}"]
               if self.dashboard else ["--include-dashboard=false"])],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.time() + timeout
        while len(self.alive_nodes()) < 1 + sum(
            t.get("min_workers", 0) for t in self.worker_types.values()
        ):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError((Path(self.temp_dir) / "head.log").read_text()[-3000:])
            time.sleep(1)
        return self

    def alive_nodes(self) -> list[dict]:
        """Ray's own view (`ray.util.state.list_nodes`) of the live nodes; [] before the
        head answers."""
        out = subprocess.run(
            [sys.executable, "-c", NODES_SCRIPT, self.address], env=self.env,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else []

    def head_node_id(self) -> str:
        return next(n["node_id"] for n in self.alive_nodes()
                    if "node:__internal_head__" in n["resources"])  # fmt: skip

    def kill_node_running(self, title: str) -> str | None:
        """SIGKILL the raylet of a worker node (not the head) on which a process titled
        `title` (e.g. "ray::FanOutWorker.run", a busy measure worker) runs, as a reclaimed
        spot node goes: its workers die with it (they are killed too: a worker whose raylet
        is gone could otherwise finish its task first). Returns the node id, None if no
        such process runs on a worker node now."""
        table = _proc_table()
        head = self.head_node_id()
        for ppid, cmd in table.values():
            raylet = table.get(ppid, (0, ""))[1]
            if not cmd.startswith(title) or "raylet/raylet" not in raylet:
                continue
            node = re.search(r"--node_id=(\w+)", raylet)
            if node and node.group(1) != head:
                for pid in [pid for pid, (parent, _) in table.items() if parent == ppid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                os.kill(ppid, signal.SIGKILL)
                return node.group(1)
        return None

    def stop(self, grace: float = 15) -> None:
        if self.proc is not None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.time() + wait
                while self.proc.poll() is None and time.time() < deadline:
                    time.sleep(0.2)
            self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> FakeCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _node_ip() -> str:
    import ray._private.services as services

    return services.get_node_ip_address()


NODES_SCRIPT = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps([{"node_id": n["NodeID"], "resources": n["Resources"],
                   "port": n["NodeManagerPort"]} for n in ray.nodes() if n["Alive"]]))
"""

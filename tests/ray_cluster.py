"""A multi-node Ray cluster on one machine: a `ray start --head` and worker nodes, all on 127.0.0.1.

Nodes may declare GPUs they do not have (Ray's GPU count is a logical resource), which is how placement is tested
without a GPU. Each node runs in its own process group and is stopped by killing that group, never with
`ray stop` (which stops every Ray on the machine). A node's environment can differ from the others' (its own
model cache, as on a real cluster where every node has its own disk).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def worker_port_range(taken: list[int], width: int = 200) -> int:
    """The first of `width` + 1 worker ports, clear of the `taken` component ports: Ray refuses to start when a
    component's port falls inside a node's worker range."""
    while True:
        start = free_ports(1)[0]
        if start + width <= 65535 and not any(start <= port <= start + width for port in taken):
            return start


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: Path
    env: dict[str, str]

    def processes(self) -> list[psutil.Process]:
        """The node's Ray processes (raylet, agents, workers), found by its process group."""
        out = []
        for p in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(p.pid) == self.proc.pid:
                    out.append(p)
        return out

    def kill(self) -> None:
        """SIGKILL every process of the node, as a lost machine would vanish: its raylet, agents and workers."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@dataclass
class LocalCluster:
    temp: Path
    gcs_port: int
    nodes: list[Node] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def client_env(self, *, by_address: bool = True, **extra: str) -> dict[str, str]:
        """The environment of a driver that joins this cluster: through RAY_ADDRESS, or (``by_address=False``) as
        the cluster `ray start` recorded on this machine, which is how ``ray.init()`` finds it."""
        env = {**_base_env(), "RAY_TMPDIR": str(self.temp), **extra}
        if by_address:
            env["RAY_ADDRESS"] = self.address
        return env

    def _start(self, name: str, args: list[str], env: dict[str, str], hide: Path | None = None) -> Node:
        ports = free_ports(7)
        objects, nodes, agent, agent_grpc, runtime_env, metrics, client = ports
        workers = worker_port_range(ports + [self.gcs_port])
        cmd = [RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
               "--object-manager-port", str(objects), "--node-manager-port", str(nodes),
               "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
               "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
               "--min-worker-port", str(workers), "--max-worker-port", str(workers + 200),
               "--object-store-memory", str(200 * 1024**2), *args]
        if "--head" in args:
            cmd += ["--ray-client-server-port", str(client)]
        if hide is not None:
            # The node's own mount namespace, an empty tmpfs over ``hide``: a machine whose disk lacks that folder.
            cmd = [*UNSHARE, "sh", "-c", 'mount -t tmpfs karlo-hidden "$0" && exec "$@"', str(hide), *cmd]
        log = self.temp / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, proc, log, env)
        self.nodes.append(node)
        return node

    def _node_env(self, env: dict[str, str] | None) -> dict[str, str]:
        # RAY_TMPDIR: the cluster's sessions, sockets and the address file of `ray start` stay in its own folder.
        return {**_base_env(), "RAY_TMPDIR": str(self.temp), **(env or {})}

    def add_node(self, *, cpus: float, gpus: int = 0, env: dict[str, str] | None = None,
                 wait: bool = True, hide: Path | None = None) -> Node:
        """Start a worker node; with ``wait``, return once the cluster counts it. With ``hide``, that folder (and
        everything under it) does not exist on the node (see :func:`can_hide_folders`)."""
        before = self.alive_nodes()
        node = self._start(f"node{len(self.nodes)}", ["--address", self.address, "--num-cpus", f"{cpus:g}",
                                                      "--num-gpus", str(gpus)], self._node_env(env), hide)
        if wait:
            self.wait_for_nodes(before + 1, node)
        return node

    def alive_nodes(self) -> int:
        """Nodes the cluster counts as alive, asked of its GCS by a short-lived driver (the state CLI needs the
        dashboard, which these nodes do not run)."""
        code = "import ray; ray.init(); print(sum(1 for n in ray.nodes() if n['Alive']))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env=self.client_env())
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0

    def wait_for_nodes(self, count: int, node: Node, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while self.alive_nodes() < count:
            assert node.proc.poll() is None, node.log.read_text()[-5000:]
            assert time.time() < deadline, f"{node.name} did not join:\n{node.log.read_text()[-5000:]}"
            time.sleep(2)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.kill()


# A private mount namespace (as root; otherwise inside a user namespace that maps the caller to root).
UNSHARE = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-r", "-m"]


def can_hide_folders() -> bool:
    """Whether this machine lets a process mount a tmpfs in a private mount namespace (containers may not)."""
    probe = tempfile.mkdtemp(prefix="kc-hide-")
    try:
        return subprocess.run([*UNSHARE, "mount", "-t", "tmpfs", "karlo-hidden", probe],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        os.rmdir(probe)


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Loopback only, and no token to hand to every node and driver (the job-submission tests cover tokens).
    env["RAY_AUTH_MODE"] = "disabled"
    # `ray` and the job's `python` are this environment's.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


@contextlib.contextmanager
def local_cluster(head_cpus: float = 2, head_gpus: int = 0, head_env: dict[str, str] | None = None):
    """A head node on 127.0.0.1; add worker nodes with ``add_node``. Everything is killed on exit."""
    # A short temp dir: Ray's Unix socket paths must stay under ~100 characters.
    temp = Path(tempfile.mkdtemp(prefix="kc-", dir="/tmp"))
    gcs = free_ports(1)[0]
    cluster = LocalCluster(temp, gcs)
    try:
        head = cluster._start("head", ["--head", "--port", str(gcs), "--include-dashboard", "false",
                                       "--num-cpus", f"{head_cpus:g}", "--num-gpus", str(head_gpus)],
                              cluster._node_env(head_env))
        cluster.wait_for_nodes(1, head)
        yield cluster
    finally:
        cluster.stop()

"""A multi-node Ray cluster on one machine: a head plus workers that declare logical GPUs and pool resources.

It mimics the production layout of ``cluster/moa-pools.yaml`` (one node type per agent
pool) so placement can be tested without a cloud: a model whose spec says
``pool: pool_a`` must land on the ``pool_a`` worker.

    python -m cluster.local_cluster start --dir /tmp/moa-lc            # head + pool_a:1 GPU + pool_b:1 GPU
    python -m cluster.local_cluster start --dir /tmp/moa-lc --worker pool_a:2 --worker pool_b:0
    eval "$(python -m cluster.local_cluster env --dir /tmp/moa-lc)"    # RAY_ADDRESS, RAY_AUTH_MODE
    python -m cluster.local_cluster stop --dir /tmp/moa-lc

Every node is one ``ray start --block`` process with its own ports (all picked free, so
clusters of parallel users do not collide) and the same temp dir; stopping sends
SIGTERM to exactly those processes, which take their Ray daemons with them. Nothing
else on the machine is touched (no ``ray stop``). GPUs are *logical*: Ray schedules
against them, no device is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moa_ray.loopback import free_ports
from moa_ray.serve.manifests import POOL_CAPACITY  # the same marker capacity as the production manifests

STATE_FILE = "cluster.json"


@dataclass
class WorkerSpec:
    """A worker node: the pool resource it declares and its logical GPUs/CPUs."""

    pool: str
    gpus: float = 1
    cpus: float = 2

    @classmethod
    def parse(cls, text: str) -> WorkerSpec:
        """``pool`` or ``pool:gpus`` or ``pool:gpus:cpus``."""
        parts = text.split(":")
        if not parts[0] or len(parts) > 3:
            raise ValueError(f"worker spec {text!r}: expected POOL[:GPUS[:CPUS]]")
        return cls(parts[0], *(float(p) for p in parts[1:]))


@dataclass
class NodeProcess:
    name: str
    pid: int
    log: str
    pool: str | None = None
    gpus: float = 0


@dataclass
class ClusterState:
    address: str
    temp_dir: str
    nodes: list[NodeProcess] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """Environment for clients of this cluster (Ray 2.59+ clusters use token auth)."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}


def _node_ip() -> str:
    import ray._private.services as services

    return services.get_node_ip_address()


def _node_args() -> list[str]:
    listen, grpc, metrics, runtime_env = free_ports(4)
    return [
        f"--dashboard-agent-listen-port={listen}",
        f"--dashboard-agent-grpc-port={grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
    ]


class LocalCluster:
    """Start/stop a head and workers; usable as a context manager."""

    def __init__(self, directory: str | Path | None = None, workers: list[WorkerSpec] | None = None, head_cpus: float = 2) -> None:
        self.dir = Path(directory or tempfile.mkdtemp(prefix="moa-lc-"))
        self.workers = workers if workers is not None else [WorkerSpec("pool_a"), WorkerSpec("pool_b")]
        self.head_cpus = head_cpus
        self.state: ClusterState | None = None
        self._procs: list[subprocess.Popen] = []

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # No 30 s drain on SIGTERM: nothing outlives a local test cluster.
        env.update({"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
        env.pop("RAY_ADDRESS", None)
        return env

    def _spawn(self, name: str, args: list[str]) -> NodeProcess:
        log = self.dir / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                ["ray", "start", "--block", *args], stdout=out, stderr=subprocess.STDOUT, env=self._env(), start_new_session=True
            )
        self._procs.append(proc)
        return NodeProcess(name=name, pid=proc.pid, log=str(log))

    @staticmethod
    def _wait_started(node: NodeProcess, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = Path(node.log).read_text(errors="replace")
            if "Ray runtime started" in text:
                return
            try:
                os.kill(node.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        tail = "\n".join(Path(node.log).read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"ray node {node.name} did not start (log {node.log}):\n{tail}")

    def _start_node(self, name: str, args: list[str], timeout_s: float, attempts: int = 3) -> NodeProcess:
        """Spawn one node and wait for it; on a loaded machine Ray's fixed 30 s registration wait can lapse, so retry."""
        for attempt in range(1, attempts + 1):
            node = self._spawn(name, args)
            try:
                self._wait_started(node, timeout_s)
                return node
            except RuntimeError:
                _signal_group(node.pid, signal.SIGKILL)
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def start(self, timeout_s: float = 120) -> ClusterState:
        """Start the head, then each worker in turn (one at a time keeps the GCS responsive on small machines)."""
        if self.state_path.exists():
            raise RuntimeError(f"{self.state_path} exists: a cluster may already run from {self.dir}; stop it first")
        self.dir.mkdir(parents=True, exist_ok=True)
        temp_dir = self.dir / "ray"
        gcs, dashboard, client = free_ports(3)
        self.state = ClusterState(address=f"{_node_ip()}:{gcs}", temp_dir=str(temp_dir))
        try:
            head = self._start_node(
                "head",
                [
                    "--head",
                    f"--port={gcs}",
                    f"--num-cpus={self.head_cpus:g}",
                    "--num-gpus=0",
                    "--include-dashboard=false",
                    f"--dashboard-port={dashboard}",
                    f"--ray-client-server-port={client}",
                    f"--temp-dir={temp_dir}",
                    "--disable-usage-stats",
                    *_node_args(),
                ],
                timeout_s,
                attempts=1,
            )
            self.state.nodes.append(head)
            self._save()
            for i, worker in enumerate(self.workers):
                node = self._start_node(
                    f"worker-{i}-{worker.pool}",
                    [
                        f"--address={self.state.address}",
                        f"--num-cpus={worker.cpus:g}",
                        f"--num-gpus={worker.gpus:g}",
                        f"--resources={json.dumps({worker.pool: POOL_CAPACITY})}",
                        f"--temp-dir={temp_dir}",
                        *_node_args(),
                    ],
                    timeout_s,
                )
                node.pool, node.gpus = worker.pool, worker.gpus
                self.state.nodes.append(node)
                self._save()
        except BaseException:
            self.stop()
            raise
        return self.state

    def _save(self) -> None:
        assert self.state is not None
        self.state_path.write_text(json.dumps(asdict(self.state), indent=2))

    def load(self) -> ClusterState:
        data = json.loads(self.state_path.read_text())
        self.state = ClusterState(address=data["address"], temp_dir=data["temp_dir"], nodes=[NodeProcess(**n) for n in data["nodes"]])
        return self.state

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM each node's ``ray start --block`` process (workers first); SIGKILL the groups of any that linger."""
        if self.state is None:
            if not self.state_path.exists():
                return
            self.load()
        assert self.state is not None
        for node in reversed(self.state.nodes):
            try:
                os.kill(node.pid, signal.SIGTERM)  # `ray start --block` shuts its own daemons down
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        for node in self.state.nodes:
            while _alive(node.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            _signal_group(node.pid, signal.SIGKILL)  # stragglers of the node's session, if any
        for proc in self._procs:
            proc.poll()
        self._procs.clear()
        self.state_path.unlink(missing_ok=True)
        self.state = None

    def __enter__(self) -> ClusterState:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    """Running, and not a zombie (an exited node whose parent has not reaped it yet)."""
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no procfs: fall back to signal 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # the node was started in its own session: its group is its own
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("start", "stop", "env"):
        p = sub.add_parser(name)
        p.add_argument("--dir", required=name != "start", help="Directory for logs, Ray temp files and the state file.")
        if name == "start":
            p.add_argument("--worker", action="append", default=None, help="POOL[:GPUS[:CPUS]] (repeatable; default pool_a:1 pool_b:1).")
            p.add_argument("--head-cpus", type=float, default=2)
    args = parser.parse_args(argv)
    if args.command == "start":
        workers = [WorkerSpec.parse(w) for w in args.worker] if args.worker else None
        cluster = LocalCluster(args.dir, workers, head_cpus=args.head_cpus)
        state = cluster.start()
        nodes = ", ".join(f"{n.name} ({n.gpus:g} GPU)" for n in state.nodes)
        print(f"started {nodes}; stop with: python -m cluster.local_cluster stop --dir {cluster.dir}", file=sys.stderr)
        print(" ".join(f"{k}={v}" for k, v in state.env.items()))
    elif args.command == "env":
        print("\n".join(f"export {k}={v}" for k, v in LocalCluster(args.dir).load().env.items()))
    else:
        LocalCluster(args.dir).stop()
        print("stopped", file=sys.stderr)


if __name__ == "__main__":
    main()

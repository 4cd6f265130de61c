"""The local Ray a CLI command starts: every port it opens is on loopback (only the HTTP proxy follows ``--host``),
and nothing of it outlives the CLI, even a ``kill -9`` of it (Linux: the checks read /proc).

Each test runs the CLI as a subprocess with its own Ray, and finds that Ray's processes without relying on
the code under test: the CLI's descendants, plus every process whose environment carries a marker the test
gave the CLI (which also finds those reparented once the raylet dies).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from serve_support import ROOT, ServerProcess

from bench.simulator import Behaviour, SimulatorConfig, run_simulator
from moa_ray import ray_reaper

pytestmark = pytest.mark.skipif(not ray_reaper.supported(), reason="reads /proc (Linux)")

MARK = "MOA_RAY_TEST_CLI_MARK"


# --------------------------------------------------------------------------- finding a CLI's processes and ports


def _table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, start time) of every live (not zombie) process."""
    return {pid: (ppid, start) for (pid, start), ppid in ray_reaper.processes().items()}


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:400]
    except OSError:
        return "?"


def session_processes(root: int, mark: str) -> dict[tuple[int, int], str]:
    """(pid, start) -> command line of ``root``'s descendants and of every process with ``MARK=mark`` in its environment."""
    table = _table()
    found = {pid for pid in table if pid != os.getpid() and _has_mark(pid, mark)}
    if root in table:
        found.add(root)
    grew = True
    while grew:
        new = {pid for pid, (ppid, _) in table.items() if ppid in found and pid not in found}
        found |= new
        grew = bool(new)
    return {(pid, table[pid][1]): _comm(pid) for pid in found}


def _has_mark(pid: int, mark: str) -> bool:
    try:
        return f"{MARK}={mark}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} writes it: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_addr)
    data = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(data)


def listening_sockets() -> dict[int, tuple[str, int]]:
    """Socket inode -> (address, port) of every TCP socket in LISTEN state (/proc/net/tcp and tcp6)."""
    out = {}
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":
                continue
            addr, port = fields[1].split(":")
            out[int(fields[9])] = (str(_address(addr)), int(port, 16))
    return out


def listening_by_process(pids: set[int]) -> list[tuple[int, str, str, int]]:
    """(pid, command, address, port) of each listening socket held by one of ``pids``."""
    sockets = listening_sockets()
    found = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in sockets:
                    found.append((pid, _comm(pid), *sockets[inode]))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def _sim_models(base_url: str) -> dict:
    # deployments of their own, so the CLI starts a local Ray (remote models in process would need none)
    model = {"backend": "openai", "base_url": base_url, "max_retries": 0, "num_cpus": 0.05, "hosting": "deployment"}
    return {name: {**model, "model": name} for name in ("p1", "agg")}


def _config(tmp_path: Path, base_url: str, server: dict | None = None) -> Path:
    path = tmp_path / "config.yaml"
    config = {"models": _sim_models(base_url), "pipelines": {"tiny": {"kind": "moa", "layers": [["p1"]], "aggregator": "agg"}}}
    if server:
        config["server"] = server
    path.write_text(yaml.safe_dump(config))
    return path


def _kill_all(procs: dict[tuple[int, int], str]) -> None:
    """Test cleanup: SIGKILL whatever of ``procs`` is still the same process."""
    table = _table()
    for pid, start in procs:
        if table.get(pid, (0, -1))[1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


# --------------------------------------------------------------------------- (a) loopback only


SERVE_REPLICA = "ray::ServeReplica:"


@pytest.mark.ray
@pytest.mark.timeout(420)
@pytest.mark.parametrize("proxy", ["haproxy", "python"])
def test_a_local_ray_listens_on_loopback_only_and_the_proxy_on_the_chosen_host(tmp_path: Path, proxy: str) -> None:
    """``moa-ray serve --host 0.0.0.0`` on a local Ray: the HTTP proxy takes 0.0.0.0 (the user's choice); every
    other listening socket of that Ray (GCS, raylet, object manager, core workers, agents, the Serve replicas'
    inter-deployment gRPC servers, which Ray Serve hardcodes to ``[::]``, and in HAProxy mode the ingress replica's
    own HTTP server, the fallback proxy and HAProxy's stats and metrics listeners: moa_ray/loopback.py) is on loopback."""
    mark = uuid.uuid4().hex
    with run_simulator(SimulatorConfig(latency_ms=5, output_tokens=4)) as sim:
        config = _config(tmp_path, sim.base_url, {"proxy": proxy})
        server = ServerProcess(config, {MARK: mark}, extra_args=("--host", "0.0.0.0"))
        procs: dict[tuple[int, int], str] = {}
        try:
            server.start()
            assert server.proc is not None
            answer = httpx.post(
                f"{server.base_url}/v1/chat/completions",
                json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
                timeout=60,
            )
            assert answer.status_code == 200, answer.text  # ingress -> agent replicas over those gRPC servers, on loopback
            procs = session_processes(server.proc.pid, mark)
            sockets = listening_by_process({pid for pid, _ in procs})
        finally:
            server.stop()
            _kill_all(procs)
            server.cleanup()
    commands = " | ".join(sorted(procs.values()))
    assert "gcs_server" in commands and "raylet" in commands, commands  # the scan sees the Ray it must check
    owners = {command.split()[0].rsplit("/", 1)[-1] for _, command, _, _ in sockets}
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= owners, sockets
    assert any(command.startswith(SERVE_REPLICA) for _, command, _, _ in sockets), sockets  # the replicas' servers are seen
    frontend = {(command.split()[0].rsplit("/", 1)[-1], address) for _, command, address, port in sockets if port == server.port}
    assert frontend == {("haproxy" if proxy == "haproxy" else "ray::ProxyActor", "0.0.0.0")}, sockets
    # HAProxy forwards to the ingress replica's own HTTP server, on a port of Ray's direct-ingress range
    ingress = [port for _, command, _, port in sockets if command.startswith(f"{SERVE_REPLICA}moa:moa-ingress")]
    assert any(30000 <= port <= 31000 for port in ingress) == (proxy == "haproxy"), sockets
    if proxy == "haproxy":
        assert len({port for _, command, _, port in sockets if "haproxy" in command.split()[0]}) >= 3, sockets
    exposed = [s for s in sockets if s[3] != server.port and not is_loopback(s[2])]
    assert exposed == [], f"listening beyond loopback: {exposed}"


def test_the_loopback_hook_moves_only_the_all_interfaces_address() -> None:
    from moa_ray.loopback import loopback_address

    assert loopback_address("[::]:0") == "127.0.0.1:0" and loopback_address("[::]:9000") == "127.0.0.1:9000"
    assert loopback_address("10.0.0.5:0") == "10.0.0.5:0" and loopback_address("127.0.0.1:7") == "127.0.0.1:7"


def _binds(template: str) -> list[str]:
    return sorted(line.strip() for line in template.splitlines() if line.strip().startswith("bind "))


@pytest.mark.parametrize(("host", "frontend"), [("0.0.0.0", "*"), ("127.0.0.1", "127.0.0.1"), ("10.1.2.3", "10.1.2.3")])
def test_haproxys_template_keeps_stats_and_metrics_on_loopback_and_the_frontend_on_the_chosen_host(host: str, frontend: str) -> None:
    from ray.serve._private import haproxy_templates

    from moa_ray.loopback import haproxy_template

    original = haproxy_templates.HAPROXY_CONFIG_TEMPLATE
    patched = haproxy_template(original, host)
    assert _binds(patched) == sorted(
        [
            "bind 127.0.0.1:{{ config.metrics_port }}",
            "bind 127.0.0.1:{{ config.stats_port }}",
            f"bind {frontend}:{{{{ config.frontend_port }}}}",
            "bind {{ config.grpc_frontend_host }}:{{ config.grpc_frontend_port }} proto h2",  # = http_options.host
        ]
    )
    assert len(patched.splitlines()) == len(original.splitlines())  # nothing else changed
    with pytest.raises(RuntimeError, match=re.escape("server: {proxy: python}")):
        haproxy_template(original.replace("bind *:{{ config.stats_port }}", "bind *:{{ config.stats_port_v2 }}"), host)


def test_a_module_is_patched_when_first_imported_and_not_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moa_ray.loopback import _AfterImport

    (tmp_path / "moa_probe_pkg").mkdir()
    (tmp_path / "moa_probe_pkg" / "__init__.py").write_text("")
    (tmp_path / "moa_probe_pkg" / "templates.py").write_text("VALUE = 'as written'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen: list[str] = []

    def patch(module: object) -> None:
        seen.append(module.VALUE)  # type: ignore[attr-defined]
        module.VALUE = "patched"  # type: ignore[attr-defined]

    finder = _AfterImport("moa_probe_pkg.templates", patch)
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    import moa_probe_pkg  # noqa: F401 - the package alone does not set it off

    assert seen == [] and finder in sys.meta_path
    from moa_probe_pkg.templates import VALUE

    assert VALUE == "patched" and seen == ["as written"] and finder not in sys.meta_path
    for name in ("moa_probe_pkg.templates", "moa_probe_pkg"):
        sys.modules.pop(name, None)


# --------------------------------------------------------------------------- (b) kill -9 leaves nothing


def _start_hung_run(tmp_path: Path, base_url: str, mark: str) -> subprocess.Popen[bytes]:
    """``moa-ray run`` against a provider that never answers: it holds its local Ray up until killed."""
    ray_dir = tempfile.mkdtemp(prefix="mr-kill-")  # short: Ray's unix socket paths live under it
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "RAY_TMPDIR": ray_dir,
        "RAY_USAGE_STATS_ENABLED": "0",
        MARK: mark,
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "moa_ray.cli", "run", "hello", "--config", str(_config(tmp_path, base_url)), "--pipeline", "tiny"]
    with open(tmp_path / "cli.log", "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_b_kill_9_of_the_cli_leaves_no_process_of_its_ray(tmp_path: Path) -> None:
    """Ray's agents used to outlive a SIGKILLed CLI for up to a minute (they report the raylet's death to a dead
    GCS first); now nothing of the session is left within a few seconds."""
    mark = uuid.uuid4().hex
    with run_simulator(SimulatorConfig(models={"p1": Behaviour(hang=True)})) as sim:
        proc = _start_hung_run(tmp_path, sim.base_url, mark)
        procs: dict[tuple[int, int], str] = {}
        try:
            deadline = time.monotonic() + 300
            while sim.stats.requests == 0:  # Ray, Serve and the agents are up, and a call is on its way
                assert proc.poll() is None, (tmp_path / "cli.log").read_text(errors="replace")[-4000:]
                assert time.monotonic() < deadline, "the CLI never called the provider"
                time.sleep(0.5)
            time.sleep(2)  # the agents a raylet starts are the ones that used to survive: let them all exist
            procs = session_processes(proc.pid, mark)
            commands = " | ".join(sorted(procs.values()))
            assert "raylet" in commands and "DashboardAgent" in commands and "RuntimeEnvAgent" in commands, commands
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            deadline = time.monotonic() + 10
            left = procs
            while left and time.monotonic() < deadline:
                time.sleep(0.25)
                table = _table()
                left = {p: c for p, c in {**procs, **session_processes(proc.pid, mark)}.items() if table.get(p[0], (0, -1))[1] == p[1]}
            assert left == {}, f"outlived the CLI by 10 s: {sorted(left.values())}"
        finally:
            if proc.poll() is None:
                proc.kill()
            _kill_all({**procs, **session_processes(proc.pid, mark)})


# --------------------------------------------------------------------------- the reaper itself (no Ray)


ORPHANING_ROOT = """
import subprocess, sys, time
# A child without the token (like a Ray agent whose title rewrite clobbered its environment); it is orphaned when this dies.
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env={"PATH": "/usr/bin:/bin"})
print(child.pid, flush=True)
time.sleep(120)
"""


def _sleeper(env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env=env)


@pytest.mark.timeout(60)
def test_tracker_kills_the_marked_processes_and_their_orphaned_descendants_only() -> None:
    token = uuid.uuid4().hex
    tracker = ray_reaper.Tracker(token, os.getpid())
    marked = subprocess.Popen(
        [sys.executable, "-c", ORPHANING_ROOT], env={**os.environ, ray_reaper.TOKEN_VAR: token}, stdout=subprocess.PIPE, text=True
    )
    bystander = _sleeper()  # same parent, no token
    child: int | None = None
    try:
        assert marked.stdout is not None
        child = int(marked.stdout.readline())
        tracker.scan()  # as the reaper does while its parent lives
        marked.kill()  # the child is reparented and has no token: only the tracker's record knows it
        marked.wait(10)
        assert child in _table(), "the orphan must outlive its parent for the check to mean anything"
        assert tracker.kill() >= 1
        deadline = time.monotonic() + 10
        while child in _table() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert child not in _table(), "the orphaned descendant of a marked process survived"
        assert bystander.poll() is None, "a process without the token was killed"
    finally:
        for p in (marked, bystander):
            if p.poll() is None:
                p.kill()
        if child is not None and child in _table():
            os.kill(child, signal.SIGKILL)


@pytest.mark.timeout(60)
def test_reaper_process_kills_its_session_when_its_stdin_closes_and_then_exits() -> None:
    token = uuid.uuid4().hex
    reaper = ray_reaper.spawn(token)
    marked = _sleeper({**os.environ, ray_reaper.TOKEN_VAR: token})
    other = _sleeper({**os.environ, ray_reaper.TOKEN_VAR: "another-session"})
    try:
        assert reaper.stdin is not None
        reaper.stdin.close()  # as when its parent dies
        assert reaper.wait(15) == 0
        assert marked.wait(10) == -signal.SIGKILL
        assert other.poll() is None, "another session's process was killed"
    finally:
        for p in (reaper, marked, other):
            if p.poll() is None:
                p.kill()


@pytest.mark.timeout(60)
def test_a_local_head_that_did_not_start_is_started_again_and_its_stuck_fork_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ray.init`` forks the head's processes with ``preexec_fn``: a fork that never reaches ``exec`` leaves no port
    file, and Ray gives up after 30 s. ``init_ray`` kills that fork and starts the head once more; any other error, or
    the same one twice, is raised as it is."""
    import ray

    from moa_ray import runtime

    calls: list[int] = []
    stuck: list[int] = []

    def init(**kwargs: object) -> None:
        calls.append(os.getpid())
        if len(calls) == 1:
            pid = os.fork()
            if pid == 0:  # a fork stuck before its exec: it runs this program and never returns
                time.sleep(60)
                os._exit(0)
            stuck.append(pid)
            raise RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_abc")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: runtime.LOCAL_RAY_HOST)
    serve_log = logging.getLogger("ray.serve")
    level = serve_log.level  # a quiet init_ray sets it to WARNING: given back below
    try:
        runtime.init_ray(num_cpus=1)
        assert len(calls) == 2
        assert os.waitpid(stuck[0], 0)[1] == signal.SIGKILL  # killed, not left to sleep its minute
        runtime.stop_reaper()

        def failing(**kwargs: object) -> None:
            calls.append(os.getpid())
            raise RuntimeError(message)

        monkeypatch.setattr(ray, "init", failing)
        for message, tries in [("Timed out waiting for file /tmp/ray/x/gcs_server_port_y", 2), ("bad resources", 1)]:
            calls.clear()
            with pytest.raises(RuntimeError, match=message.split()[0]):
                runtime.init_ray(num_cpus=1)
            assert len(calls) == tries
    finally:
        runtime.stop_reaper()
        serve_log.setLevel(level)

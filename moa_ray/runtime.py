"""Starting or joining Ray for a run, and releasing it: the lifecycle alone (deploying agents is serve/deploy.py's)."""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import logging
import os
import signal
import subprocess
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from moa_ray import loopback
from moa_ray.backends.registry import descriptor_for
from moa_ray.config import ModelSpecBase
from moa_ray.errors import ConfigError

log = logging.getLogger(__name__)


def check_local_extras(models: Iterable[ModelSpecBase]) -> None:
    """Before a local Ray starts: what every backend the run deploys needs is installed here (one line naming how)."""
    for spec in models:
        descriptor = descriptor_for(spec)
        for module in descriptor.modules:
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"backend {descriptor.name!r}: {descriptor.missing_module_message(module)}")


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    quiet: bool = True,
    models: Iterable[ModelSpecBase] = (),
    env: Mapping[str, str] | None = None,
) -> None:
    """Join ``address`` (or RAY_ADDRESS), or start a local Ray, after checking that ``models`` can run here; idempotent.

    ``env``: environment variables for every process of a local Ray this starts (Ray Serve reads its proxy
    from there: :mod:`moa_ray.serve.proxy`); a cluster that is joined keeps the environment it was started with.
    A local Ray exports its metrics (:mod:`moa_ray.metrics`, Serve's, vLLM's) on loopback at the port that
    :data:`METRICS_PORT_ENV` names in ``env`` or in this process's environment (else a port of Ray's choosing).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "logging_level": logging.ERROR if quiet else logging.INFO}
    if quiet:
        kwargs["log_to_driver"] = False
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # A loopback address (a CLI-started Ray joined from this machine) stays loopback: see _loopback_node.
        with _loopback_node() if is_loopback_address(address) else contextlib.nullcontext():
            ray.init(address=address, **kwargs)
    else:
        check_local_extras(models)
        # Logical CPUs above the core count avoid actor-pool deadlocks on small machines;
        # the embedded model's threads are set by its config, not by this number.
        cpus = num_cpus or max(8, os.cpu_count() or 1)
        export_port = metrics_port({**os.environ, **(env or {})})
        for attempt in range(1, HEAD_START_ATTEMPTS + 1):
            try:
                # "local": never attach to the latest `ray start` cluster of this machine by surprise.
                with _loopback_node(), _reaped_session(), _environment(env or {}):
                    before = _children()
                    try:
                        ray.init(
                            address="local",
                            num_cpus=cpus,
                            include_dashboard=False,
                            _node_ip_address=LOCAL_RAY_HOST,
                            runtime_env={"worker_process_setup_hook": loopback.HOOK},
                            _metrics_export_port=export_port,
                            **kwargs,
                        )
                    except Exception as err:
                        if _head_did_not_start(err):  # before the reaper stops: a stuck fork holds its stdin open
                            _kill_unexecuted_forks(before)
                        raise
                break
            except Exception as err:
                if attempt == HEAD_START_ATTEMPTS or not _head_did_not_start(err):
                    raise
                log.warning("the local Ray's head did not start (%s): starting it again", str(err).splitlines()[0])
                ray.shutdown()
        node_ip = ray.util.get_node_ip_address()
        if node_ip != LOCAL_RAY_HOST:  # a Ray whose node-IP rules changed: say so rather than expose it silently
            log.warning("the local Ray runs on %s, not %s: its ports may be reachable from other machines", node_ip, LOCAL_RAY_HOST)


#: How many times :func:`init_ray` starts a local Ray's head that did not come up (see :func:`_head_did_not_start`).
HEAD_START_ATTEMPTS = 2


def _head_did_not_start(err: Exception) -> bool:
    """Whether ``ray.init`` gave up waiting for the head's processes (the GCS's port file, the node's registration).

    Ray starts them with ``preexec_fn`` (``services.start_ray_process``), so each is forked from this process and
    runs Python before its ``exec``; a later Ray of the same process forks while the earlier one's gRPC and Serve
    threads are still running (gRPC logs "Other threads are currently calling into gRPC, skipping fork() handlers"
    every time), and a child that inherits a lock held by one of them never reaches ``exec``: no log, no port file.
    Seen once in CI, for the GCS of a session's second local Ray; a second start succeeds.
    """
    text = str(err)
    return "Timed out waiting for file" in text or "timed out during startup" in text


def _children() -> set[tuple[int, int]]:
    """This process's children, as ``(pid, start time)`` (unique even when a pid is reused)."""
    from moa_ray import ray_reaper

    if not ray_reaper.supported():
        return set()
    me = os.getpid()
    return {proc for proc, ppid in ray_reaper.processes().items() if ppid == me}


def _kill_unexecuted_forks(before: set[tuple[int, int]]) -> None:
    """SIGKILL the children started since ``before`` that still run this very program with this very command line:
    forks of ``ray.init`` stuck before their ``exec`` (see :func:`_head_did_not_start`), which also hold the reaper's
    stdin open. Those that did ``exec`` (Ray's Python processes included: another command line) carry the session's
    token: the reaper kills them as it stops."""

    def program(pid: int | str) -> tuple[str, bytes]:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return os.readlink(f"/proc/{pid}/exe"), cmdline.read()

    try:
        me = program("self")
    except OSError:
        return
    for pid, _start in _children() - before:
        try:
            if program(pid) == me:
                log.warning("killing pid %d, a fork of ray.init that never started its program", pid)
                os.kill(pid, signal.SIGKILL)
        except OSError:  # gone meanwhile
            continue


#: The environment variable that fixes the port a local Ray exports its Prometheus metrics on (``/metrics``).
METRICS_PORT_ENV = "MOA_RAY_METRICS_PORT"


def metrics_port(env: Mapping[str, str]) -> int | None:
    """The metrics port :data:`METRICS_PORT_ENV` names in ``env``, or None (Ray picks one)."""
    value = env.get(METRICS_PORT_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ConfigError(f"{METRICS_PORT_ENV}={value!r} is not a port number")
    return int(value)


def is_loopback_address(address: str) -> bool:
    """Whether a Ray address (``host:port``, ``[v6]:port``, ``ray://host:port``) names this machine's loopback."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "auto", a hostname
        return False


#: The node IP of a local Ray the CLI starts: every port of it (GCS, raylet, object manager, workers, agents) binds here.
LOCAL_RAY_HOST = loopback.HOST


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Let ``ray.init`` keep a loopback node IP, which makes Ray bind every port of the node to loopback only.

    Ray binds its gRPC servers to 127.0.0.1 exactly when the node IP is 127.0.0.1 (else to all interfaces),
    and its agents follow the node IP too; but on Linux ``ray.init(_node_ip_address="127.0.0.1")`` swaps
    loopback for the machine's routable IP unless ``ray_constants.ENABLE_RAY_CLUSTER`` is off
    (``services.resolve_ip_for_localhost`` -> ``get_node_ip_address``), the switch behind
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` that gives macOS and Windows a loopback-only local Ray by default.
    The environment variable is read once at import (before this runs when Ray is already imported), and a
    process-wide change would also make a later ``ray.init(address=...)`` advertise loopback to a remote
    cluster; so the switch is off only while this process starts its own node, or joins one by a loopback address
    (which Ray would swap the same way, and the loopback-only GCS would not answer). Ray Serve's replicas bind
    their inter-deployment gRPC server to ``[::]``, hardcoded: :mod:`moa_ray.loopback` moves it to loopback.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    """``env`` in this process's environment while the block starts a local Ray (its processes inherit it)."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


#: The running reaper of this process's local Ray (its stdin is the pipe whose closing sets it off), or None.
_reaper: subprocess.Popen[bytes] | None = None


@contextlib.contextmanager
def _reaped_session() -> Iterator[None]:
    """Mark the processes the block starts (a local Ray's head; its raylet's workers and agents inherit the mark)
    and start :mod:`moa_ray.ray_reaper`, which kills every marked process once this process is gone, even by
    ``kill -9``. No-op where the reaper cannot see other processes' environments (not Linux).
    """
    global _reaper
    from moa_ray import ray_reaper

    if not ray_reaper.supported():
        yield
        return
    stop_reaper()  # an earlier session of this process is over: sweep what it left
    token = uuid.uuid4().hex
    _reaper = ray_reaper.spawn(token)
    try:
        with _environment({ray_reaper.TOKEN_VAR: token}):
            yield
    except BaseException:
        stop_reaper()  # a half-started Ray: kill what it started
        raise


def stop_reaper(wait_s: float = 15.0) -> None:
    """End this process's local Ray session for good: the reaper kills what is left of it, then exits."""
    global _reaper
    reaper, _reaper = _reaper, None
    if reaper is None:
        return
    if reaper.stdin is not None:
        reaper.stdin.close()
    try:
        reaper.wait(wait_s)
    except subprocess.TimeoutExpired:
        log.warning("the Ray reaper (pid %d) did not finish in %.0f s", reaper.pid, wait_s)


def is_shared_cluster(address: str | None = None) -> bool:
    """Whether this process joins an existing cluster (``address`` or RAY_ADDRESS) rather than starting its own."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def release_ray(app_names: Iterable[str], *, shared: bool, drain: bool = True) -> None:
    """Leave Ray as found: delete our Serve apps from a shared cluster, or shut down Serve on our own; then disconnect.

    ``drain=False``: our own Ray goes down at once, without Serve's graceful shutdown (~5 s on 2 cores), as a
    process's exit takes it: for a run whose calls are all over (a session's agents), not for a server's requests.
    """
    import ray
    from ray import serve

    try:
        if shared:
            for name in app_names:
                try:
                    serve.delete(name)
                except Exception as err:  # noqa: BLE001 - cleanup must not hide the outcome of what ran
                    log.warning("could not delete Serve app %r: %s", name, err)
        elif drain:
            serve.shutdown()
        else:
            _forget_serve_client()
    finally:
        ray.shutdown()
        if not shared:
            stop_reaper()


def _forget_serve_client() -> None:
    """Drop this process's cached handle of a Serve controller that is about to go with its Ray, as ``serve.shutdown``
    does, so that a later Ray of this process starts its own Serve without first probing the dead one."""
    try:
        from ray.serve.context import _disconnect
    except ImportError:  # pragma: no cover - a Ray without it: Serve finds the handle stale on its own (a few seconds)
        return
    _disconnect()


@contextlib.contextmanager
def ray_session(
    address: str | None = None, *, num_cpus: int | None = None, apps: Iterable[str] = (), env: Mapping[str, str] | None = None
) -> Iterator[None]:
    """Ray for one command (a benchmark, a script): joined or started (with ``env``) on entry, released on exit
    (:func:`release_ray`)."""
    init_ray(address, num_cpus=num_cpus, env=env)
    try:
        yield
    finally:
        release_ray(apps, shared=is_shared_cluster(address))

"""Keep what Ray Serve opens on loopback in a local Ray the CLI starts; only the HTTP frontend follows ``--host``.

A loopback node (GCS, raylet, workers, agents) binds 127.0.0.1, but Ray Serve 2.60 hardcodes two kinds of
listener to every interface:

* each replica's inter-deployment gRPC server (``ray/serve/_private/replica.py``, ``Replica._on_initialized``:
  ``add_port_to_grpc_server(server, "[::]:0")``), only ever reached at the 127.0.0.1 the node advertises;
* in HAProxy mode (``RAY_SERVE_ENABLE_HA_PROXY=1``), HAProxy's Prometheus and stats listeners
  (``ray/serve/_private/haproxy_templates.py``: ``bind :<metrics port>``, ``bind *:<stats port>``).

:func:`keep_serve_on_loopback`, run in every worker of the local Ray (``worker_process_setup_hook``) before any
Serve code is imported, binds them to loopback. In HAProxy mode Serve's own HTTP servers (the ingress replicas',
the fallback proxy) follow ``http_options.host``, which moa-ray sets to loopback there: HAProxy's frontend alone
binds the host the user chose (:data:`FRONTEND_HOST_VAR`). This module is imported by every worker, so it imports
nothing heavy, and HAProxy's template is patched when Serve imports it, not before.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import random
import socket
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

#: The ``worker_process_setup_hook`` that a CLI-started local Ray gives its job (see moa_ray.runtime.init_ray).
HOOK = f"{__name__}.keep_serve_on_loopback"
#: The node IP of a local Ray the CLI starts (``moa_ray.runtime.LOCAL_RAY_HOST``): every port of it binds here.
HOST = "127.0.0.1"
ALL_INTERFACES = "[::]:"
#: The host HAProxy's frontend binds on a local Ray in HAProxy mode (set by moa_ray.serve.proxy.local_env).
FRONTEND_HOST_VAR = "MOA_RAY_HTTP_HOST"
HAPROXY_TEMPLATES = "ray.serve._private.haproxy_templates"
#: Ray Serve's switch for its HAProxy ingress, read from every Ray process's environment.
HAPROXY_VAR = "RAY_SERVE_ENABLE_HA_PROXY"


def loopback_address(address: str) -> str:
    """``[::]:PORT`` (every interface) becomes ``127.0.0.1:PORT``; any explicit address stays as it is."""
    return f"{HOST}:{address[len(ALL_INTERFACES) :]}" if address.startswith(ALL_INTERFACES) else address


def haproxy_frontend(host: str) -> str:
    """HAProxy's spelling of a bind host: every interface is ``*`` (as Ray writes it)."""
    return "*" if host in ("", "0.0.0.0", "::") else host


def haproxy_template(template: str, frontend_host: str) -> str:
    """Ray's HAProxy config template with its stats and metrics listeners on loopback and its frontend on ``frontend_host``.

    Raises RuntimeError when a listener is not where this Ray version was known to write it: serving with a
    listener left on every interface would break the local Ray's promise, so it fails to start instead.
    """
    binds = {  # HAProxy config lines Ray writes -> the same on loopback, the frontend on the chosen host
        "bind :{{ config.metrics_port }}": f"bind {HOST}:{{{{ config.metrics_port }}}}",
        "bind *:{{ config.stats_port }}": f"bind {HOST}:{{{{ config.stats_port }}}}",
        "bind {{ config.frontend_host }}:{{ config.frontend_port }}": f"bind {haproxy_frontend(frontend_host)}:{{{{ config.frontend_port }}}}",
    }
    missing = [line for line in binds if line not in template]
    if missing:
        raise RuntimeError(
            f"moa-ray cannot keep HAProxy's listeners on loopback with this Ray version (no {missing[0]!r} in its "
            "config template); serve with `server: {proxy: python}` instead"
        )
    for line, replacement in binds.items():
        template = template.replace(line, replacement)
    return template


#: Where :func:`free_ports` looks: above Ray's worker ports (10002-19999) and below the kernel's ephemeral range
#: (Linux: 32768-60999), from which every port-0 bind and outgoing connection (Ray's own servers among them) draws:
#: a port picked there could be taken in the seconds before Serve binds it.
PICKED_PORTS = range(20000, 32768)


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that are free right now (held open together so they differ), from
    :data:`PICKED_PORTS`, which nothing takes without asking for it by number."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for port in random.sample(PICKED_PORTS, len(PICKED_PORTS)):
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            ports.append(port)
            if len(ports) == count:
                return ports
    raise OSError(f"no {count} free loopback ports in {PICKED_PORTS.start}-{PICKED_PORTS.stop - 1}")


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``patch(module)`` once the module ``name`` has been executed, the first time anything imports it."""

    def __init__(self, name: str, patch: Callable[[ModuleType], None]) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader, patch = spec.loader, self.patch

        class _Patching(importlib.abc.Loader):
            def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
                return loader.create_module(spec)

            def exec_module(self, module: ModuleType) -> None:
                loader.exec_module(module)
                patch(module)

        spec.loader = _Patching()
        return spec


def _patch_haproxy_templates(module: ModuleType) -> None:
    if getattr(module, "_moa_loopback", False):
        return
    template = haproxy_template(getattr(module, "HAPROXY_CONFIG_TEMPLATE", ""), os.environ.get(FRONTEND_HOST_VAR, HOST))
    setattr(module, "HAPROXY_CONFIG_TEMPLATE", template)  # noqa: B010 - a module mypy cannot see into
    setattr(module, "_moa_loopback", True)  # noqa: B010
    haproxy = sys.modules.get("ray.serve._private.haproxy")  # imported already: it holds its own copy
    if haproxy is not None:
        setattr(haproxy, "HAPROXY_CONFIG_TEMPLATE", template)  # noqa: B010


def keep_serve_on_loopback() -> None:
    """On a loopback node: Ray's gRPC port helper through :func:`loopback_address`, and, in HAProxy mode,
    HAProxy's template through :func:`haproxy_template` once Serve imports it (idempotent)."""
    import ray
    from ray._common import tls_utils

    if ray.util.get_node_ip_address() != HOST:
        return
    if os.environ.get(HAPROXY_VAR) == "1" and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        if HAPROXY_TEMPLATES in sys.modules:
            _patch_haproxy_templates(sys.modules[HAPROXY_TEMPLATES])
        else:
            sys.meta_path.insert(0, _AfterImport(HAPROXY_TEMPLATES, _patch_haproxy_templates))
    if getattr(tls_utils.add_port_to_grpc_server, "_moa_loopback", False):
        return
    original: Callable[[Any, str], Any] = tls_utils.add_port_to_grpc_server

    def add_port_to_grpc_server(server: Any, address: str) -> int:
        return int(original(server, loopback_address(address)))

    add_port_to_grpc_server._moa_loopback = True  # type: ignore[attr-defined]
    tls_utils.add_port_to_grpc_server = add_port_to_grpc_server

"""Keep Ray Serve's replica gRPC servers on loopback in a local Ray the CLI starts.

Ray Serve 2.60 binds each replica's inter-deployment gRPC server to every interface, hardcoded
(``ray/serve/_private/replica.py``, ``Replica._on_initialized``: ``add_port_to_grpc_server(server, "[::]:0")``),
while the rest of a loopback node (GCS, raylet, workers, agents) binds 127.0.0.1. A loopback node advertises
127.0.0.1 to its callers, so that server is only ever reached there: this hook, run in every worker of the
local Ray (``worker_process_setup_hook``) before any replica code is imported, binds it there too.
This module is imported by every worker, so it imports nothing heavy.
"""

from __future__ import annotations

from typing import Any

#: The ``worker_process_setup_hook`` that a CLI-started local Ray gives its job (see moa_ray.runtime.init_ray).
HOOK = f"{__name__}.bind_replica_grpc_to_loopback"
#: The node IP of a local Ray the CLI starts (``moa_ray.runtime.LOCAL_RAY_HOST``): every port of it binds here.
HOST = "127.0.0.1"
ALL_INTERFACES = "[::]:"


def loopback_address(address: str) -> str:
    """``[::]:PORT`` (every interface) becomes ``127.0.0.1:PORT``; any explicit address stays as it is."""
    return f"{HOST}:{address[len(ALL_INTERFACES) :]}" if address.startswith(ALL_INTERFACES) else address


def bind_replica_grpc_to_loopback() -> None:
    """Route Ray's gRPC port helper through :func:`loopback_address`, on a loopback node only (idempotent)."""
    import ray
    from ray._common import tls_utils

    if ray.util.get_node_ip_address() != HOST or getattr(tls_utils.add_port_to_grpc_server, "_moa_loopback", False):
        return
    original = tls_utils.add_port_to_grpc_server

    def add_port_to_grpc_server(server: Any, address: str) -> int:
        return int(original(server, loopback_address(address)))

    add_port_to_grpc_server._moa_loopback = True  # type: ignore[attr-defined]
    tls_utils.add_port_to_grpc_server = add_port_to_grpc_server

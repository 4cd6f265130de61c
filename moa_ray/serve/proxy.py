"""The HTTP proxy in front of the ingress (``server.proxy``), and the Ray environment that picks it.

Ray Serve takes its proxy from the environment of every Ray process, fixed when a node starts
(``RAY_SERVE_ENABLE_HA_PROXY``), so moa-ray sets it where it starts Ray: the local Ray of ``moa-ray serve``
(:func:`local_env`) and every node of the clusters its manifests describe (:func:`cluster_env`).

With HAProxy each ingress replica runs its own HTTP server and HAProxy, a C proxy, forwards clients to it: a
request and each streamed event cross no Ray actor, and the replica reads the body from its own socket instead
of fetching it back from the proxy actor by a remote call. On this 2-core machine, at 20 requests in flight, the
endpoint's p50 over calling the pipeline directly is -0.8 ms against the Python proxy's +111 ms, and a streamed
answer's +2.5 ms against +214 ms (bench/serve_load.py; README, "The request path").
"""

from __future__ import annotations

import os

from moa_ray.config import ServerSpec
from moa_ray.loopback import FRONTEND_HOST_VAR, HAPROXY_VAR, HOST, free_ports

#: How long HAProxy waits for a client that sends nothing while a request is due (Ray's default: 3600 s). A request
#: the ingress refused before its body came (408, 413) is answered with ``Connection: close``, and the replica closes
#: its side, but HAProxy 2.8 keeps the client's connection to drain the body until this runs out (from the answer).
#: An idle keep-alive connection, a long answer and a stream's pauses are not bound by it (``timeout http-keep-alive``
#: and ``timeout server`` are); a client silent this long mid-request gets HAProxy's 400 before the ingress's 408.
CLIENT_TIMEOUT_S = 5
HAPROXY_ENV = {HAPROXY_VAR: "1", "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": str(CLIENT_TIMEOUT_S)}

#: How long a removed ingress replica keeps answering in HAProxy mode, so that balancers stop sending it requests
#: first (Ray's default: 30 s). A local Ray has no balancer but its HAProxy, which the controller updates at once.
LOCAL_DRAINING_PERIOD_S = 1


def cluster_env(server: ServerSpec) -> dict[str, str]:
    """Environment for every node of a cluster whose endpoint runs behind ``server.proxy``."""
    return dict(HAPROXY_ENV) if server.proxy == "haproxy" else {}


def local_env(server: ServerSpec, host: str) -> dict[str, str]:
    """Environment for a local Ray that serves HTTP on ``host``.

    In HAProxy mode: HAProxy's frontend on ``host`` (everything else on loopback: :mod:`moa_ray.loopback`); its
    side listeners (the fallback proxy, stats, metrics) on free ports, not Ray's fixed defaults, which a second
    local session (a test run beside a server) would find taken; a short drain of a removed ingress replica; and
    no more HAProxy threads than cores.
    """
    if server.proxy != "haproxy":
        return {}
    fallback_http, fallback_grpc, metrics, stats = free_ports(4)
    return {
        **HAPROXY_ENV,
        FRONTEND_HOST_VAR: host,
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback_http),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(fallback_grpc),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(LOCAL_DRAINING_PERIOD_S),
        "RAY_SERVE_HAPROXY_NBTHREAD": str(min(4, os.cpu_count() or 1)),
    }


def http_options(server: ServerSpec, host: str, port: int, *, local: bool) -> dict[str, str | int]:
    """Serve's ``http_options``. On a local Ray in HAProxy mode, Serve's own HTTP servers (the ingress replicas',
    the fallback proxy) follow this host, so it is loopback: HAProxy's frontend alone takes ``host``."""
    return {"host": HOST if local and server.proxy == "haproxy" else host, "port": port}

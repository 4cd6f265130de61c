"""A picture of the Grafana dashboard's panels over a real scrape (the README's Operating section shows it).

It runs the real thing end to end, except Grafana itself: ``moa-ray serve --metrics-port`` over the LLM simulator
(a MoA and an SMoA pipeline; one proposer fails 30% of its attempts and retries, one is down and falls back, the
judge's verdict needs repairing and ends the debate), a real Prometheus (the ``prometheus`` binary: Debian's
``apt-get install prometheus``) scraping the metrics port every 2 s, and a load of ``--clients`` clients ramping up
and down over ``--duration`` seconds with some refused requests. Then every panel of the dashboard that ``moa-ray
serve k8s`` writes (:func:`moa_ray.serve.dashboard.grafana_dashboard`) has its own PromQL evaluated by that
Prometheus (``query_range``, Grafana's ``$__rate_interval`` set to 20 s, the variables to all) and drawn with
matplotlib in the dashboard's grid. Grafana is not installable here; the panels' queries, the scrape and the
numbers are the real ones, the drawing is matplotlib's. Where vLLM is installed (its CPU build will do), a third
pipeline has the shipped SmolLM2 vLLM agent as a proposer, so the engine panels show a real engine too.

    python -m bench.dashboard_snapshot --duration 240 --clients 6 --out docs/dashboard.png

The last line is ``panels_with_data <n>/<total>``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.simulator import Behaviour, SimulatorConfig, free_port, run_simulator
from moa_ray.serve.dashboard import grafana_dashboard

SCRAPE_INTERVAL_S = 2
RATE_INTERVAL = "20s"
JUDGE_REPLY = json.dumps({"reasoning": "the first is best", "chosen_responses": [1], "end_debate": True})
PROMPTS = ["What is Ray Serve?", "Name three uses of a mixture of agents.", "Why do layers help?", "Explain KV caches."]


def endpoint_config(base_url: str, *, vllm: bool) -> dict[str, Any]:
    """Simulated providers (priced, one flaky, one down with a fallback, a judge) and, with ``vllm``, the shipped
    SmolLM2 vLLM agent (vLLM's CPU build) as one proposer of a third pipeline, so the engine panels have data."""
    model = {"backend": "openai", "base_url": base_url, "max_retries": 3, "backoff_s": 0.05, "max_tokens": 64}
    priced = {"pricing": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}}
    config: dict[str, Any] = {
        "models": {
            "qwen": {**model, **priced, "model": "qwen"},
            "llama": {**model, "model": "llama", "pricing": {"input_per_mtok": 0.9, "output_per_mtok": 0.9}},
            "mistral": {**model, "model": "mistral", "pricing": {"input_per_mtok": 0.6, "output_per_mtok": 0.6}},
            "gemma-down": {**model, "model": "gemma-down", "max_retries": 0, "fallbacks": ["llama"]},
            "judge": {**model, "model": "judge", "pricing": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}},
        },
        "pipelines": {
            "moa": {"kind": "moa", "layers": [["qwen", "llama", "mistral"]] * 2, "aggregator": "qwen"},
            "smoa": {"kind": "smoa", "layers": [["llama", "mistral", "gemma-down"]] * 2, "aggregator": "qwen", "judge": "judge", "k": 2},
        },
    }
    if vllm:
        from moa_ray.config import load_config

        config["models"]["smollm2-vllm"] = load_config().models["smollm2-vllm"].model_dump(mode="json", exclude_none=True)
        proposers = [{"model": "smollm2-vllm", "max_tokens": 48}, "llama", "mistral"]
        config["pipelines"]["moa-vllm"] = {"kind": "moa", "layers": [proposers], "aggregator": "qwen"}
    return config


@contextlib.contextmanager
def server(config_path: Path, port: int, metrics_port: int, workdir: Path) -> Iterator[str]:
    """``moa-ray serve`` in its own process group, healthy; stopped with Ctrl+C at the end."""
    env = {**os.environ, "RAY_TMPDIR": str(workdir / "ray"), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(workdir / "server.log", "w")
    cmd = [
        sys.executable,
        "-m",
        "moa_ray.cli",
        "serve",
        "--config",
        str(config_path),
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while "serving" not in (workdir / "server.log").read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"moa-ray serve did not start:\n{(workdir / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@contextlib.contextmanager
def prometheus(binary: str, metrics_port: int, workdir: Path) -> Iterator[str]:
    """A Prometheus scraping the metrics port every :data:`SCRAPE_INTERVAL_S` seconds; yields its URL."""
    port = free_port()
    config = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
        "scrape_configs": [{"job_name": "moa-ray", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    cmd = [
        binary,
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    log = open(workdir / "prometheus.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"prometheus did not start:\n{(workdir / 'prometheus.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def load(url: str, duration_s: float, clients: int, pipelines: list[str], seed: int = 0) -> dict[int, int]:
    """``clients`` threads, started one after another over the first half and stopped in reverse over the last
    third (a ramp); one of ``pipelines`` at random, a streamed request in three, and one in fifteen refused (an unknown pipeline, or an
    invalid body). Returns the count of each status."""
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    start = time.monotonic()

    def client(i: int) -> None:
        rng = random.Random(seed + i)
        begin = start + duration_s * 0.5 * i / clients
        end = start + duration_s * (1 - 0.33 * i / clients)
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.monotonic() < begin:
                time.sleep(0.2)
            while time.monotonic() < end:
                body: dict[str, Any] = {
                    "model": rng.choice(pipelines),
                    "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                }
                if rng.random() < 1 / 3:
                    body.update(stream=True, stream_options={"include_usage": True})
                if rng.random() < 1 / 15:
                    body = {"model": "gpt-5"} if rng.random() < 0.5 else {"model": "moa", "messages": []}
                response = http.post("/v1/chat/completions", json=body)
                with lock:
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                time.sleep(rng.uniform(0.1, 0.6))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def series(prom: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    """A PromQL expression over [start, end] as Prometheus evaluates it (the dashboard's variables set to all)."""
    query = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$pipeline", ".*").replace("$model", ".*")
    response = httpx.get(
        f"{prom}/api/v1/query_range", params={"query": query, "start": start, "end": end, "step": SCRAPE_INTERVAL_S}, timeout=30
    )
    response.raise_for_status()
    return response.json()["data"]["result"]


def legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip()


UNITS = {"s": "seconds", "reqps": "per second", "short": "per second", "currencyUSD": "USD per hour", "percentunit": "fraction"}


def draw(dashboard: dict[str, Any], data: dict[int, list[tuple[str, list[dict[str, Any]]]]], out: Path, start: float) -> int:
    """The panels in the dashboard's grid (24 columns; a grid row 0.4 inch high); returns how many had data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    unit_in, header_in = 0.42, 0.9  # inches per grid row; above the grid
    fig_h = height * unit_in + header_in
    fig = plt.figure(figsize=(20, fig_h), dpi=72)
    fig.suptitle(
        f"{dashboard['title']}: the dashboard's panels, evaluated by Prometheus over a real scrape of moa-ray serve "
        "(drawn with matplotlib, not Grafana)",
        fontsize=13,
        y=1 - 0.3 / fig_h,
    )
    with_data = 0
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        top_in = header_in + pos["y"] * unit_in  # from the figure's top
        if panel["type"] == "row":
            fig.text(0.01, 1 - (top_in + pos["h"] * unit_in / 2) / fig_h, panel["title"], fontsize=13, fontweight="bold", va="center")
            continue
        # inside the panel's cell: 0.4 in for its title above, 0.5 in for the time axis below, 0.7 in for the y label
        bottom = 1 - (top_in + pos["h"] * unit_in - 0.5) / fig_h
        plot_h = (pos["h"] * unit_in - 0.9) / fig_h
        left = pos["x"] / 24 + 0.7 / 20
        ax = fig.add_axes((left, bottom, pos["w"] / 24 - 0.9 / 20, plot_h))
        ax.set_title(panel["title"], fontsize=11, loc="left")
        drawn = 0
        for template, results in data[panel["id"]]:
            for result in results:
                xs = [(float(t) - start) / 60 for t, _ in result["values"]]
                ys = [float(v) for _, v in result["values"]]
                finite = [(x, y) for x, y in zip(xs, ys, strict=True) if y == y and abs(y) != float("inf")]
                if finite:
                    ax.plot(*zip(*finite, strict=True), label=legend(template, result["metric"]), linewidth=1.4)
                    drawn += 1
        unit = panel["fieldConfig"]["defaults"]["unit"]
        ax.set_ylabel(UNITS.get(unit, unit), fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if drawn:
            with_data += 1
            ax.set_xlabel("minutes", fontsize=8)
            ax.legend(fontsize=7, loc="upper left", ncol=2 if drawn > 4 else 1, framealpha=0.6)
        else:
            ax.text(
                0.5,
                0.5,
                "No data (no vLLM engine in this run)" if "vLLM" in panel["title"] else "No data",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="grey",
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return with_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=240, help="Seconds of load.")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--prometheus", default="prometheus", help="The Prometheus binary.")
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument("--no-vllm", action="store_true", help="Leave out the vLLM agent (its engine panels stay empty).")
    args = parser.parse_args()
    vllm = not args.no_vllm and importlib.util.find_spec("vllm") is not None
    binary = shutil.which(args.prometheus)
    if binary is None:
        raise SystemExit(f"{args.prometheus}: not found (Debian/Ubuntu: apt-get install prometheus)")

    sim_config = SimulatorConfig(
        latency_ms=150,
        jitter_ms=250,
        output_tokens=48,
        seed=0,
        models={
            "qwen": Behaviour(latency_ms=400, jitter_ms=500, output_tokens=64),
            "mistral": Behaviour(latency_ms=150, jitter_ms=250, output_tokens=40, failure_rate=0.3, failure_status=503),
            "gemma-down": Behaviour(latency_ms=5, failure_rate=1.0, failure_status=500),
            "judge": Behaviour(latency_ms=120, reply=JUDGE_REPLY),
        },
    )
    dashboard = grafana_dashboard()
    workdir = Path(tempfile.mkdtemp(prefix="mr-dash-"))
    try:
        with run_simulator(sim_config) as sim:
            config_path = workdir / "config.yaml"
            config = endpoint_config(sim.base_url, vllm=vllm)
            config_path.write_text(yaml.safe_dump(config))
            metrics_port = free_port()
            with server(config_path, free_port(), metrics_port, workdir) as url, prometheus(binary, metrics_port, workdir) as prom:
                start = time.time()
                statuses = load(url, args.duration, args.clients, list(config["pipelines"]))
                time.sleep(6 * SCRAPE_INTERVAL_S)  # Ray exports every few seconds; then the last scrapes
                end = time.time()
                data = {
                    p["id"]: [(t["legendFormat"], series(prom, t["expr"], start, end)) for t in p["targets"]]
                    for p in dashboard["panels"]
                    if p["type"] != "row"
                }
        with_data = draw(dashboard, data, args.out, start)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    total = sum(1 for p in dashboard["panels"] if p["type"] != "row")
    print(f"responses by status: {dict(sorted(statuses.items()))}")
    print(f"wrote {args.out}")
    print(f"panels_with_data {with_data}/{total}")


if __name__ == "__main__":
    main()

"""Ray Jobs end to end on a real head node: a generate job submitted through the Job Submission API,
and a generate run killed with SIGKILL halfway then rerun (exactly N rows, no duplicates, no loss).

The head node is started with ``ray start --head --block`` on free ports in its own process
group and its own temp dir, and stopped by signalling that group (never ``ray stop``,
which would stop every Ray on the machine). The models are the LLM simulator, run as
its own process so the job's Serve replicas can reach it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import yaml
from eval_support import eval_config

from bench.simulator import free_port

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    return env


def _stop_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Stop a process this test started (SIGTERM: `ray start --block` then stops its node), then
    SIGKILL whatever is left of its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster():
    """A head node on free ports plus a simulator process; yields (gcs address, dashboard url, config path)."""
    from ray.job_submission import JobSubmissionClient

    temp = tempfile.mkdtemp(prefix="moaj", dir="/tmp")
    gcs, dash, client_port, agent = free_port(), free_port(), free_port(), free_port()
    sim_port = free_port()
    log = open(Path(temp) / "head.log", "wb")
    sim = subprocess.Popen(
        [sys.executable, "-m", "bench.simulator", "--port", str(sim_port), "--latency-ms", "150", "--output-tokens", "16"],
        cwd=ROOT,
        env=_env(),
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    head = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={client_port}",
            f"--dashboard-agent-listen-port={agent}",
            "--num-cpus=4",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        cwd=ROOT,
        env=_env(),
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    dashboard = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{sim_port}/v1/models", timeout=1).raise_for_status()
                JobSubmissionClient(dashboard).list_jobs()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline or head.poll() is not None or sim.poll() is not None:
                    raise RuntimeError(f"head node or simulator did not start; see {temp}/head.log") from None
                time.sleep(1)
        cfg = Path(temp) / "config.yaml"
        cfg.write_text(yaml.safe_dump(eval_config(f"http://127.0.0.1:{sim_port}/v1")))
        yield f"127.0.0.1:{gcs}", dashboard, cfg
    finally:
        _stop_group(head, timeout=10)
        _stop_group(sim)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_generate_job_through_the_job_submission_api(cluster, tmp_path: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    _, dashboard, cfg = cluster
    out = tmp_path / "out"
    client = JobSubmissionClient(dashboard)
    job = client.submit_job(
        entrypoint=f"python -m jobs.generate --config {cfg} --pipeline one,two --dataset alpaca_eval --limit 4 "
        f"--out {out} --concurrency 4 --worker-cpus 0.01 --no-progress",
        runtime_env={"working_dir": str(ROOT), "excludes": [".git", "tests/data", "**/__pycache__"]},
    )
    deadline = time.monotonic() + 300
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, "job did not finish"
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "8 rows ok, 0 failed" in logs
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 8 and {r["pipeline"] for r in rows} == {"one", "two"}
    assert all(r["status"] == "ok" and r["output"] for r in rows)


def _rows(out: Path) -> list[dict]:
    try:
        return pq.read_table(out).to_pylist() if out.exists() else []
    except OSError:  # a part file renamed in while listing
        return []


def test_kill_and_resume(cluster, tmp_path: Path) -> None:
    address, _, cfg = cluster
    out, n = tmp_path / "out", 40

    def command(run_id: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "jobs.generate",
            "--address",
            address,
            "--config",
            str(cfg),
            "--pipeline",
            "one",
            "--dataset",
            "alpaca_eval",
            "--limit",
            str(n),
            "--out",
            str(out),
            "--concurrency",
            "2",
            "--worker-cpus",
            "0.01",
            "--no-progress",
            "--app-name",
            "t-kill",
            "--run-id",
            run_id,
        ]

    first = subprocess.Popen(
        command("first"), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while len(_rows(out)) < n // 4:
            assert first.poll() is None, first.stderr.read().decode()[-3000:] if first.stderr else "exited"
            assert time.monotonic() < deadline, "the first run wrote nothing"
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)  # the driver dies mid-run; its workers die with it
        first.wait(timeout=10)
    finally:
        _stop_group(first)
    survived = _rows(out)
    assert 0 < len(survived) < n, "kill landed outside the run"

    second = subprocess.run(command("second"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{len(survived)} already done" in second.stderr

    rows = _rows(out)
    keys = [(r["prompt_id"], r["pipeline"], r["turn"]) for r in rows]
    assert len(rows) == n and len(set(keys)) == n  # exactly N rows, no duplicates
    assert {r["prompt_id"] for r in rows} == {f"ae-{i:03d}" for i in range(n)}  # no loss
    assert all(r["status"] == "ok" for r in rows)
    runs = {r["prompt_id"]: r["run_id"] for r in rows}
    assert all(runs[r["prompt_id"]] == "first" for r in survived)  # finished work was kept, not redone
    assert sum(1 for r in rows if r["run_id"] == "second") == n - len(survived)

"""``eval judge`` and ``eval report`` over large generation tables: judging plans a range of prompts at a time, and the
report reads Arrow columns (no Python row per answer or judgment) and no text it does not use, so both stay flat from
10k to 50k answers.

Each run is a child process, so its peak RSS is its own. Slow lane: the tables are written first (about a minute).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.eval_memory import write_judged_run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys
from click.testing import CliRunner
from moa_ray.cli import main
from moa_ray.eval.judging import JudgeOptions, StoredAnswers, count_planned

gen, judged, report, what = sys.argv[1:5]
if what == "judge":
    options = JudgeOptions(judge="j", generations=gen, out=judged, run_id="r", progress=False)
    with StoredAnswers(gen) as answers:
        result = count_planned(answers, options)
else:
    done = CliRunner().invoke(main, ["eval", "report", "--generations", gen, "--judgments", judged, "--out", report, "--no-proposers"])
    assert done.exit_code == 0, done.output
    result = json.load(open(report + "/report.json"))
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss": peak_kb * 1024, "result": result}))
"""


def run(out: Path, what: str) -> dict:
    args = [str(out / "gen"), str(out / "judged"), str(out / "report"), what]
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_judging_and_report_memory_is_flat_from_10k_to_50k_answers(tmp_path: Path) -> None:
    runs = {}
    for prompts in (5_000, 25_000):
        write_judged_run(tmp_path / str(prompts), prompts)
        runs[prompts] = {what: run(tmp_path / str(prompts), what) for what in ("judge", "report")}
    small, large = runs[5_000], runs[25_000]
    assert (small["judge"]["result"], large["judge"]["result"]) == (1_000, 5_000)  # every tenth prompt, both pipelines
    judge_small, judge_large = small["judge"]["peak_rss"], large["judge"]["peak_rss"]
    assert judge_large <= 1.2 * judge_small, f"eval judge's plan: {judge_small / 2**20:.0f} -> {judge_large / 2**20:.0f} MiB"
    assert judge_large <= 500 * 2**20, f"eval judge's plan: {judge_large / 2**20:.0f} MiB at 50k answers"
    # the report holds Arrow columns of numbers, not a dict per answer and per judgment (those took ~0.6 GB at 50k)
    report_small, report_large = small["report"]["peak_rss"], large["report"]["peak_rss"]
    assert report_large <= 1.2 * report_small, f"eval report: {report_small / 2**20:.0f} -> {report_large / 2**20:.0f} MiB"
    assert report_large <= 500 * 2**20, f"eval report: {report_large / 2**20:.0f} MiB at 50k answers"
    assert [(r["pipeline"], r["answers"], r["n_judged"]) for r in large["report"]["result"]] == [
        ("one", 25_000, 22_500),
        ("two", 25_000, 22_500),
    ]

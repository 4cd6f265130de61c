"""``eval judge`` and ``eval report`` over large generation tables: judging plans a range of prompts at a time, so its
memory stays flat from 10k to 50k answers; the report reads no text it does not use.

Each run is a child process, so its peak RSS is its own. Slow lane: the tables are written first (about a minute).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from moa_ray.eval.benchmarks.alpaca_eval import pairwise_table
from moa_ray.eval.schema import GenerationRow, PairwiseRow
from moa_ray.eval.store import RowTable

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()

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


def write_tables(out: Path, prompts: int) -> None:
    """Two pipelines' answers to ``prompts`` prompts with references, all but every tenth prompt judged pairwise."""
    rnd = random.Random(1)

    def text(words: int) -> str:
        return " ".join(rnd.choice(WORDS) for _ in range(words))

    gens, judged = RowTable(str(out / "gen"), GenerationRow), pairwise_table(str(out / "judged"))
    answers: list[GenerationRow] = []
    judgments: list[PairwiseRow] = []
    for i in range(prompts):
        instruction, reference = text(30), text(150)
        for pipeline in ("one", "two"):
            output = text(100 + i % 80)
            fields = {"run_id": "g", "prompt_id": f"p{i:07d}", "pipeline": pipeline, "instruction": instruction}
            answers.append(
                GenerationRow(**fields, turn=1, dataset="prompts.jsonl", output=output, reference=reference, config_hash="h", latency_s=0.5)
            )
            if i % 10:
                judgments.append(
                    PairwiseRow(
                        **{**fields, "run_id": "j"},
                        judge="j",
                        judge_prompt="pair-v2",
                        output_1=reference,
                        generator_1="ref",
                        output_2=output,
                        generator_2=pipeline,
                        preference=rnd.choice([1.0, 1.5, 2.0]),
                        judgment_reference_first=text(60),
                        judgment_pipeline_first=text(60),
                    )
                )
        if len(answers) >= 10_000:
            gens.write_part(answers, f"{i:08d}")
            judged.write_part(judgments, f"{i:08d}")
            answers, judgments = [], []
    gens.write_part(answers, "last")
    judged.write_part(judgments, "last")


def run(out: Path, what: str) -> dict:
    args = [str(out / "gen"), str(out / "judged"), str(out / "report"), what]
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_judging_memory_is_flat_and_the_report_reads_no_text_from_10k_to_50k_answers(tmp_path: Path) -> None:
    runs = {}
    for prompts in (5_000, 25_000):
        write_tables(tmp_path / str(prompts), prompts)
        runs[prompts] = {what: run(tmp_path / str(prompts), what) for what in ("judge", "report")}
    small, large = runs[5_000], runs[25_000]
    assert (small["judge"]["result"], large["judge"]["result"]) == (1_000, 5_000)  # every tenth prompt, both pipelines
    judge_small, judge_large = small["judge"]["peak_rss"], large["judge"]["peak_rss"]
    assert judge_large <= 1.2 * judge_small, f"eval judge's plan: {judge_small / 2**20:.0f} -> {judge_large / 2**20:.0f} MiB"
    assert judge_large <= 500 * 2**20, f"eval judge's plan: {judge_large / 2**20:.0f} MiB at 50k answers"
    # the report keeps a row per answer and per judgment, without their texts (the whole rows took ~0.9 GB at 50k)
    assert large["report"]["peak_rss"] <= 650 * 2**20, f"eval report: {large['report']['peak_rss'] / 2**20:.0f} MiB at 50k answers"
    assert [(r["pipeline"], r["answers"], r["n_judged"]) for r in large["report"]["result"]] == [
        ("one", 25_000, 22_500),
        ("two", 25_000, 22_500),
    ]

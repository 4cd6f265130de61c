"""`python -m jobs.judge`: the Ray job entrypoint of `moa-ray eval judge` (same options)."""

from moa_ray.cli.eval import judge_command

if __name__ == "__main__":
    judge_command(prog_name="python -m jobs.judge")

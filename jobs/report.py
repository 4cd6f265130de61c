"""`python -m jobs.report`: the Ray job entrypoint of `moa-ray eval report` (same options)."""

from moa_ray.cli.eval import report_command

if __name__ == "__main__":
    report_command(prog_name="python -m jobs.report")

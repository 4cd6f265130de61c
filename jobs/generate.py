"""`python -m jobs.generate`: the Ray job entrypoint of `moa-ray eval generate` (same options)."""

from moa_ray.cli.eval import generate_command

if __name__ == "__main__":
    generate_command(prog_name="python -m jobs.generate")

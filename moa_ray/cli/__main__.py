"""``python -m moa_ray.cli``: the ``moa-ray`` command."""

from moa_ray.cli import main

if __name__ == "__main__":  # pragma: no cover
    main()

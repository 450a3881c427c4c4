"""`python -m qgen_ray ...` is the `qgen` command."""

from qgen_ray.cli import main

main()

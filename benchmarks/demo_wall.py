"""Wall time of the demo study end to end (`studies/demo.py`: 16 models, train -> measure
-> corrupt -> landscape -> report, Ray's start included), each run into a fresh store.
`make demo` adds the venv install to the first run (~2-3 min).

Prints figures; asserts nothing about time.

    python benchmarks/demo_wall.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import hardware, summary

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="runs (>= 3 for a range)")
    args = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    walls = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            subprocess.run([sys.executable, "studies/demo.py", "--storage", tmp, "--quiet"],
                           cwd=REPO, env=env, check=True, capture_output=True)  # fmt: skip
            walls.append(time.time() - t0)
    print(f"# hardware: {hardware()}; load average {os.getloadavg()[0]:.1f} at the end")
    print(f"studies/demo.py end to end (Ray start included), {args.repeats} runs: "
          f"{summary(walls, '{:.0f}')} s")  # fmt: skip


if __name__ == "__main__":
    main()

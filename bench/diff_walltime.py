#!/usr/bin/env python3
"""Whole-process wall time of `autoglm-tune diff` (and `--help`) on this machine: median of N runs.

Usage: python3 bench/diff_walltime.py [--runs 21] [--cli PATH]
Prints one JSON object; the figures in README.md come from it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def measure(argv: list[str], runs: int) -> dict[str, float]:
    times = []
    subprocess.run(argv, capture_output=True)  # warm the page cache once
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True)
        times.append(time.perf_counter() - start)
        if proc.returncode not in (0, 1):
            sys.exit(f"{' '.join(argv)} failed: {proc.stderr.decode()}")
    return {
        "median_ms": round(statistics.median(times) * 1000, 1),
        "min_ms": round(min(times) * 1000, 1),
        "max_ms": round(max(times) * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=21)
    default_cli = shutil.which("autoglm-tune", path=str(Path(sys.executable).parent)) or "autoglm-tune"
    parser.add_argument("--cli", default=default_cli)
    args = parser.parse_args()
    result = {
        "machine": f"{platform.node()} {platform.machine()} {platform.release()}, {__import__('os').cpu_count()} CPUs",
        "python": platform.python_version(),
        "runs": args.runs,
        "diff": measure([args.cli, "diff"], args.runs),
        "diff --json": measure([args.cli, "diff", "--json"], args.runs),
        "python -c pass (floor)": measure([sys.executable, "-c", "pass"], args.runs),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

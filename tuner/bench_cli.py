"""The `autoglm-tune bench` command: options and exit codes. The machinery is in bench.py, imported on use so
that other commands do not pay for it (registered on the main app by cli.py)."""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import BadInput, TuneError, fail

# The names bench.py defines (checked equal by tests/bench): listed here for --help without importing it.
SCENARIO_NAMES = ("heavy", "mild", "fits", "cpu")
CONFIG_NAMES = ("limit", "untuned", "recipe", "autoglm-tune", "tuned")
MODEL_SIZES = ("tiny", "1.1b", "3b")
ALL_SCENARIOS, ALL_CONFIGS = ",".join(SCENARIO_NAMES), ",".join(CONFIG_NAMES)


def _opt(flag: str, text: str) -> Any:
    return typer.Option(flag, help=text)


def bench_command(
    scenario: Annotated[str, _opt("--scenario", f"Comma-separated: {', '.join(SCENARIO_NAMES)}.")] = ALL_SCENARIOS,
    config: Annotated[str, _opt("--config", f"Comma-separated: {', '.join(CONFIG_NAMES)}.")] = ALL_CONFIGS,
    rounds: Annotated[int, _opt("--rounds", "Rounds per scenario (≥ 5 near the thrash edge).")] = 5,
    model: Annotated[Path | None, _opt("--model", "A GGUF model file instead of a generated one.")] = None,
    model_size: Annotated[str, _opt("--model-size", f"Generated model: {', '.join(MODEL_SIZES)}.")] = "1.1b",
    ram_mib: Annotated[int, _opt("--ram-mib", "Emulated RAM (MemTotal) for the capped scenarios.")] = 4096,
    emulate: Annotated[str, _opt("--emulate", "hugetlb (RAM taken from the kernel) or cgroup (a limit).")] = "hugetlb",
    desktop: Annotated[int | None, _opt("--desktop-mib", "Desktop size instead of the scenario's.")] = None,
    tokens: Annotated[int, _opt("--tokens", "Tokens generated per run.")] = 64,
    context: Annotated[int, _opt("--context", "Context size of the server.")] = 1024,
    threads: Annotated[int | None, _opt("--threads", "Threads for every config (default: each its own).")] = None,
    policy: Annotated[Path | None, _opt("--policy", "Policy TOML for the autoglm-tune config.")] = None,
    work: Annotated[Path, _opt("--work", "Models, swap file and logs.")] = Path("/var/tmp/autoglm-bench"),
    out: Annotated[Path | None, _opt("--out", "results.json, bench.png, BENCHMARKS.md go here.")] = None,
    docs: Annotated[Path | None, _opt("--docs", "Also write the markdown table to FILE.")] = None,
    preliminary: Annotated[str | None, _opt("--preliminary", "Mark the results noisy, saying why.")] = None,
) -> None:
    """Measure what tuning buys: a real llama.cpp server per scenario and configuration, interleaved."""
    from . import bench as b

    try:
        opts = b.Options(
            scenarios=b.parse_list("--scenario", scenario, tuple(b.SCENARIOS)),
            configs=b.parse_list("--config", config, b.CONFIGS),
            rounds=rounds, ram_mib=ram_mib, emulate=emulate, desktop_mib=desktop, tokens=tokens, context=context,
            threads=threads,
        )
        if emulate not in b.EMULATIONS:
            raise BadInput(f"--emulate {emulate!r}: allowed: {', '.join(b.EMULATIONS)}")
        if model_size not in MODEL_SIZES:
            raise BadInput(f"--model-size {model_size!r}: allowed: {', '.join(MODEL_SIZES)}")
        if policy is not None and not policy.is_file():
            raise BadInput(f"--policy {policy}: no such file; allowed: a policy TOML file")
        mem = b.meminfo()
        b.check_options(opts, mem["MemTotal"] // 1024, (mem["MemTotal"] - mem["MemAvailable"]) // 1024)
        if os.geteuid() != 0:
            raise BadInput("bench changes kernel settings and must run as root; allowed: sudo autoglm-tune bench")
        notes = []
        if "tuned" in opts.configs and shutil.which("tuned") is None:
            notes.append("tuned: TuneD is not installed (apt-get install tuned)")
            opts = dataclasses.replace(opts, configs=tuple(c for c in opts.configs if c != "tuned"))
        work.mkdir(parents=True, exist_ok=True)
        m = b.prepare_model(model, model_size, work, context)
        command = "autoglm-tune bench " + shlex.join(sys.argv[2:])
        doc, problems = b.bench(opts, m, work, policy, command, preliminary, notes, sys.stderr)
        target = out or work / time.strftime("results-%Y%m%d-%H%M%S")
        b.write_outputs(doc, target, docs, sys.stderr)
        typer.echo(f"bench: results in {target} ({len(doc['runs'])} runs)")
        for s in doc["summary"]:
            typer.echo(f"  {s['scenario']:<6} {s['config']:<13} tok/s {b.cell(s['tok_s'], 1):<24} "
                       f"÷ limit {b.cell(s['ratio_to_limit'])}  OOM kills {s['oom_kills']}")
        if problems:
            raise b.BenchError("not restored: " + "; ".join(problems))
        if doc["error"]:
            raise b.BenchError(doc["error"])
        typer.echo(f"bench: restored {len(doc['restored']['settings'])} settings and the swap areas; verified")
    except TuneError as exc:
        raise fail(exc) from None
    if doc["interrupted"]:
        raise typer.Exit(128 + doc["interrupted"])


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)

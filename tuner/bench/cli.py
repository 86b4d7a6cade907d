"""The `autoglm-tune bench` command: options and exit codes. The machinery (design, machine, report, runner) is
imported on use so that other commands do not pay for it (registered on the main app by autoglm_tune.cli)."""

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

from ..errors import BadInput, TuneError, fail

# The names design.py defines (checked equal by tests/bench): listed here for --help without importing it.
SCENARIO_NAMES = ("heavy", "mild", "fits", "cpu", "idle", "cold", "prompt")
CONFIG_NAMES = ("limit", "untuned", "hand-tune", "hand-nice", "recipe-literal", "recipe-512mb", "tuned",
                "autoglm-tune", "no-nice", "no-resident", "kernel-only", "zswap-on")
MODEL_SIZES = ("tiny", "1.1b", "3b", "9b")
SERVER_NAMES = ("llama-server", "llama-cpp-python")
ALL_SCENARIOS, ALL_CONFIGS = ",".join(SCENARIO_NAMES), ",".join(CONFIG_NAMES)


def _opt(flag: str, text: str) -> Any:
    return typer.Option(flag, help=text)


def bench_command(
    scenario: Annotated[str, _opt("--scenario", f"Comma-separated: {', '.join(SCENARIO_NAMES)}.")] = ALL_SCENARIOS,
    config: Annotated[str, _opt("--config", f"Comma-separated: {', '.join(CONFIG_NAMES)}.")] = ALL_CONFIGS,
    rounds: Annotated[int, _opt("--rounds", "Rounds per scenario (≥ 5 near the thrash edge).")] = 5,
    model: Annotated[Path | None, _opt("--model", "A GGUF model file instead of a generated one.")] = None,
    model_size: Annotated[str, _opt("--model-size", f"Generated model: {', '.join(MODEL_SIZES)}.")] = "9b",
    ram_mib: Annotated[int, _opt("--ram-mib", "Emulated RAM (MemTotal) for the capped scenarios.")] = 8192,
    server: Annotated[str, _opt("--server", f"Model server: {', '.join(SERVER_NAMES)}.")] = "llama-server",
    server_bin: Annotated[Path | None, _opt("--server-bin", "llama-server binary (default: PATH, then the cached "
                                            "host build).")] = None,
    mmap: Annotated[bool, typer.Option("--mmap/--no-mmap", help="Weights mmap'd (the servers' default).")] = True,
    idle_s: Annotated[int, _opt("--idle-s", "Seconds the idle scenario leaves the loaded model alone.")] = 120,
    prompt_tokens: Annotated[int, _opt("--prompt-tokens", "Prompt length of the prompt scenario.")] = 1536,
    file_mib: Annotated[int, _opt("--file-mib", "The desktop's file cache (MiB, 0: none).")] = 256,
    run_timeout_s: Annotated[int, _opt("--run-timeout-s", "A request's time limit; what arrived counts.")] = 600,
    emulate: Annotated[str, _opt("--emulate", "hugetlb (RAM taken from the kernel) or cgroup (a limit).")] = "hugetlb",
    desktop: Annotated[int | None, _opt("--desktop-mib", "Desktop size instead of the scenario's.")] = None,
    tokens: Annotated[int, _opt("--tokens", "Tokens generated per run (≥ 256 for a per-run p99).")] = 256,
    context: Annotated[int, _opt("--context", "Context size of the server.")] = 4096,
    threads: Annotated[int | None, _opt("--threads", "Threads for every config (default: each its own).")] = None,
    policy: Annotated[Path | None, _opt("--policy", "Policy TOML for the autoglm-tune config.")] = None,
    work: Annotated[Path, _opt("--work", "Models, swap file and logs.")] = Path("/var/tmp/autoglm-bench"),
    out: Annotated[Path | None, _opt("--out", "results.json, bench.png, BENCHMARKS.md go here.")] = None,
    docs: Annotated[Path | None, _opt("--docs", "Also write the markdown table to FILE.")] = None,
    preliminary: Annotated[str | None, _opt("--preliminary", "Mark the results noisy, saying why.")] = None,
) -> None:
    """Measure what tuning buys: a real llama.cpp server per scenario and configuration, interleaved."""
    from . import design, machine, report, runner

    try:
        opts = design.Options(
            scenarios=design.parse_list("--scenario", scenario, tuple(design.SCENARIOS)),
            configs=design.parse_list("--config", config, design.CONFIGS),
            rounds=rounds, ram_mib=ram_mib, emulate=emulate, desktop_mib=desktop, tokens=tokens, context=context,
            threads=threads, server=server, mmap=mmap, idle_s=idle_s, prompt_tokens=prompt_tokens, file_mib=file_mib,
            run_timeout_s=run_timeout_s,
        )
        if emulate not in design.EMULATIONS:
            raise BadInput(f"--emulate {emulate!r}: allowed: {', '.join(design.EMULATIONS)}")
        if model_size not in MODEL_SIZES:
            raise BadInput(f"--model-size {model_size!r}: allowed: {', '.join(MODEL_SIZES)}")
        if policy is not None and not policy.is_file():
            raise BadInput(f"--policy {policy}: no such file; allowed: a policy TOML file")
        mem = machine.meminfo()
        design.check_options(opts, mem["MemTotal"] // 1024, (mem["MemTotal"] - mem["MemAvailable"]) // 1024)
        if os.geteuid() != 0:
            raise BadInput("bench changes kernel settings and must run as root; allowed: sudo autoglm-tune bench")
        notes = []
        if "tuned" in opts.configs and shutil.which("tuned") is None:
            notes.append("tuned: TuneD is not installed (apt-get install tuned)")
            opts = dataclasses.replace(opts, configs=tuple(c for c in opts.configs if c != "tuned"))
        work.mkdir(parents=True, exist_ok=True)
        binary = runner.find_llama_server(server_bin) if server == "llama-server" else server_bin
        m = runner.prepare_model(model, model_size, work, context)
        probe = runner.prepare_model(None, "tiny", work, 256).path
        command = "autoglm-tune bench " + shlex.join(sys.argv[2:])
        doc, problems = runner.bench(opts, m, work, policy, command, preliminary, notes, sys.stderr, binary, probe)
        target = out or work / time.strftime("results-%Y%m%d-%H%M%S")
        runner.write_outputs(doc, target, docs, sys.stderr)
        typer.echo(f"bench: results in {target} ({len(doc['runs'])} runs)")
        for s in doc["summary"]["rows"]:
            typer.echo(f"  {s['scenario']:<6} {s['config']:<14} {report.cell(s['value'], 3):<24} ÷ untuned "
                       f"{report.interval_cell(s['vs'].get('untuned')):<20} failed {s['failed']['count']}/{s['runs']}")
        for t in doc["summary"]["targets"]:
            typer.echo(f"  target {t['scenario']} {t['config']} ÷ {t['versus']} ≥ {t['target']}: "
                       f"{report.interval_cell(t['interval'])} → {t['holds']}")
        if problems:
            raise runner.BenchError("not restored: " + "; ".join(problems))
        if doc["error"]:
            raise runner.BenchError(doc["error"])
        typer.echo(f"bench: restored {len(doc['restored']['settings'])} settings and the swap areas; verified")
    except TuneError as exc:
        raise fail(exc) from None
    if doc["interrupted"]:
        raise typer.Exit(128 + doc["interrupted"])


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)

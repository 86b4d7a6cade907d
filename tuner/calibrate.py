"""`autoglm-tune calibrate` (options in calibrate_cli.py): the user's own model measured on the user's own machine
with llama-bench from the launch preset's build, over the candidate CPU sets of calibrate_core; the choice written
as a policy drop-in.

The imperative shell: checks (model, memory fit, budget, output directory) before anything runs, the memcpy
probe, the interleaved decode bursts (each llama-bench pinned to its candidate's CPUs, in a session of its own so
that Ctrl-C or SIGTERM leaves nothing running), progress on stderr, and the atomic write of the drop-in.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from . import calibrate_core as core
from .errors import BadInput, Interrupted, TuneError

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
MEMCPY_MIB = 128  # beyond the last-level cache of the machines this is for; 256 MiB in all while it runs


class CalibrateError(TuneError):
    """llama-bench failed or printed nothing usable: exit 1."""


class _Stop(Exception):
    """SIGTERM or SIGHUP, raised where the main thread is, like KeyboardInterrupt."""


def find_llama_bench(given: Path | None, program: str) -> Path:
    """--llama-bench, else llama-bench beside the preset's program, then on PATH, then beside the cached host
    build the bench uses (bench.find_llama_server)."""
    import shutil

    if given is not None:
        if not (given.is_file() and os.access(given, os.X_OK)):
            raise BadInput(f"--llama-bench {given}: not an executable file; allowed: the path of llama-bench")
        return given
    server = shutil.which(program)
    beside = Path(server).resolve().with_name("llama-bench") if server else None
    if beside is not None and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("llama-bench")
    if found:
        return Path(found)
    from .bench.runner import find_llama_server

    with contextlib.suppress(BadInput):
        cached = find_llama_server(None).with_name("llama-bench")
        if os.access(cached, os.X_OK):
            return cached
    raise BadInput(f"no llama-bench found beside {program}, on PATH or in the cached host build; "
                   "allowed: --llama-bench PATH")


def check_output(path: Path) -> None:
    """BadInput unless a policy file can be made there: a .toml name (what the drop-in is written as, and what
    policy.d reads), not a directory, in a directory where a file can be made (tried, then removed)."""
    problem = "is a directory" if path.is_dir() else "not a .toml file name" if path.suffix != ".toml" else ""
    if problem:
        raise BadInput(f"-o {path}: {problem}; allowed: a file such as /etc/autoglm-tune/policy.d/50-calibrated.toml")
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as exc:
        raise BadInput(f"-o {path}: the directory {path.parent} is not writable ({exc.strerror}); "
                       "allowed: a file in a writable directory (root for /etc/autoglm-tune/policy.d)") from None


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory, renamed over it when complete."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), 0o644)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def burst(bench_bin: Path, model: Path, cand: core.Candidate, tokens: int, timeout_s: float) -> float:
    """One decode burst of `tokens` tokens on the candidate's CPUs and threads: llama-bench's tok/s."""
    argv = [str(bench_bin), "-m", str(model), "-p", "0", "-n", str(tokens), "-t", str(cand.threads), "-r", "1",
            "-ngl", "0", "-o", "json"]
    cpus = set(cand.cpus)

    def child() -> None:
        os.sched_setaffinity(0, cpus)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    # A stop signal while the child is being started would leave it running unseen: held until `proc` is known.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=child)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        raise
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        out, err = proc.communicate(timeout=timeout_s)
    except BaseException as exc:  # Ctrl-C, SIGTERM, the timeout: the burst's whole session goes with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise CalibrateError(f"llama-bench ({cand.label()}) ran past {timeout_s:.0f} s and was killed") from None
        raise
    try:
        return float(json.loads(out)[0]["avg_ts"])
    except (ValueError, KeyError, IndexError, TypeError):
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise CalibrateError(f"llama-bench ({cand.label()}) exited {proc.returncode}: {last}") from None


def progress(err: TextIO, done_s: float, budget_s: int, label: str) -> None:
    width = 30
    filled = min(width, int(width * done_s / budget_s))
    line = f"[{'#' * filled}{'.' * (width - filled)}] {max(0, budget_s - done_s):.0f} s left  {label}"
    if err.isatty():
        err.write(f"\r\033[K{line}")
    else:
        err.write(f"calibrate: {line}\n")
    err.flush()


def measure(bench_bin: Path, model: Path, cands: list[core.Candidate], budget_s: int, context_length: int | None,
            err: TextIO) -> tuple[float, list[dict[str, float]], int, float]:
    """The memcpy probe, a warm-up burst, then rounds until decided or the budget is spent:
    (memcpy GB/s, rounds, tokens per burst, seconds taken)."""
    from .bench.machine import memcpy_gbs

    start = time.monotonic()
    progress(err, 0, budget_s, "memcpy probe")
    gbs = memcpy_gbs(MEMCPY_MIB)
    warm = burst(bench_bin, model, cands[0], core.MIN_TOKENS, budget_s)  # also brings the model into the page cache
    tokens = core.burst_tokens(warm, context_length)
    rounds: list[dict[str, float]] = []
    longest = 0.0  # the slowest round so far: a round is begun only when one as slow still fits the budget
    while True:
        began = time.monotonic()
        current: dict[str, float] = {}
        for cand in core.rotated(cands, len(rounds)):
            left = budget_s - (time.monotonic() - start)
            current[cand.name] = burst(bench_bin, model, cand, tokens, max(30.0, left + 30))
            progress(err, time.monotonic() - start, budget_s,
                     f"round {len(rounds) + 1}: {cand.name} {current[cand.name]:.1f} tok/s")
        rounds.append(current)
        longest = max(longest, time.monotonic() - began)
        elapsed = time.monotonic() - start
        if core.decide(cands, rounds).decided:
            break
        if len(rounds) == 1 and elapsed + (core.MIN_ROUNDS - 1) * longest > budget_s:
            need = round(elapsed + (core.MIN_ROUNDS - 1) * longest) + 1
            raise BadInput(f"--budget {budget_s}s: too short for {core.MIN_ROUNDS} rounds with this model (one round "
                           f"takes {longest:.1f} s); allowed: --budget {need}s or more")
        if elapsed + longest > budget_s:
            break
    if err.isatty():
        err.write("\n")
    return gbs, rounds, tokens, time.monotonic() - start


def calibrate(model: Path | None, budget: str, json_out: bool, output: Path | None, policy_file: Path | None,
              llama_bench: Path | None) -> str:
    """The whole command: every check before anything runs, the measurement, the drop-in (written with -o);
    returns what goes to stdout (the drop-in, or with --json the measurements)."""
    from . import launch as lc
    from .collect import collect_facts
    from .planner import make_plan
    from .policy import load_policy
    from .presets import load_preset

    try:
        budget_s = core.parse_budget(budget)
    except ValueError:
        raise BadInput(f"--budget {budget!r}: not a duration; allowed: seconds or minutes such as 120s, 90, 2m") \
            from None
    pol = load_policy(policy_file)
    path_text = str(model) if model is not None else pol["model"]["model_path"]
    if not path_text:
        raise BadInput("no model: give --model FILE or set [model] model_path; allowed: the path of a GGUF file")
    model_file = Path(os.path.abspath(path_text))
    if not model_file.is_file() or not os.access(model_file, os.R_OK) or "\n" in str(model_file):
        raise BadInput(f"--model {path_text}: not a readable file; allowed: the path of a GGUF model file")
    machine = lc.gather(model_file)
    if machine.shape is None:
        raise BadInput(f"--model {path_text}: not a GGUF file; allowed: a GGUF model file (llama-bench reads GGUF)")
    fit = lc.memory_fit(machine, core.MAX_TOKENS)
    if fit is not None and fit.verdict == "does not fit":
        raise BadInput(f"--model {path_text}: {fit.message()}; allowed: a model that fits in memory")
    if fit is not None and fit.verdict == "tight":
        sys.stderr.write(f"calibrate: warning: {fit.message()}: the bursts may measure swapping, not decoding\n")
    if output is not None:
        check_output(output)
    facts = collect_facts(Path("/"))
    default = make_plan(facts, replace(pol, calibration=None)).process
    cands = core.candidates(facts.cpu, machine.allowed_cpus, default.cpus)
    if not cands:
        raise BadInput("no CPU to measure on: the CPU topology is unknown here (see 'autoglm-tune facts')")
    least = core.minimum_budget_s(len(cands))
    if budget_s < least:
        raise BadInput(f"--budget {budget}: too short to measure {len(cands)} candidate CPU sets in "
                       f"{core.MIN_ROUNDS} rounds; allowed: --budget {least}s or more")
    bench_bin = find_llama_bench(llama_bench, lc.program_of(pol["model"], load_preset(pol["model"]["preset"])))
    st = model_file.stat()
    err = sys.stderr
    err.write(f"calibrate: {len(cands)} candidates on {core.topology(facts.cpu)}:\n")
    for c in cands:
        err.write(f"  {c.label()}\n")
    gbs, rounds, tokens, elapsed = _interruptible(bench_bin, model_file, cands, budget_s,
                                                  machine.shape.context_length, err)
    result = core.Result(
        cands=cands, rounds=rounds, decision=core.decide(cands, rounds), memcpy_gbs=gbs, model_path=str(model_file),
        model_bytes=st.st_size, model_mtime_ns=st.st_mtime_ns, topology=core.topology(facts.cpu),
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), host=facts.hostname or "unknown", elapsed_s=elapsed,
        budget_s=budget_s, tokens=tokens,
    )
    text = core.drop_in(result)
    if output is not None:
        try:
            write_atomically(output, text)
        except OSError as exc:
            raise BadInput(f"-o {output}: cannot write the drop-in ({exc.strerror}); nothing was written") from None
        err.write(f"calibrate: wrote {output}\n")
    if json_out:
        return json.dumps({**result.to_dict(), "drop_in": text, "output": str(output) if output else None},
                          indent=2) + "\n"
    return text


def _interruptible(bench_bin: Path, model: Path, cands: list[core.Candidate], budget_s: int,
                   context_length: int | None, err: TextIO) -> tuple[float, list[dict[str, float]], int, float]:
    """`measure`, with SIGTERM and SIGHUP handled as Ctrl-C: the burst running is killed, nothing is written."""

    def stop(signum: int, _frame: Any) -> None:
        raise _Stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return measure(bench_bin, model, cands, budget_s, context_length, err)
    except (KeyboardInterrupt, _Stop):
        err.write("\n")
        raise Interrupted("calibrate interrupted: the measurement stopped, nothing was written") from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)



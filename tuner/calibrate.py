"""`autoglm-tune calibrate` (options in calibrate_cli.py): the user's own model measured on the user's own machine
with llama-bench from the launch preset's build, over the candidate CPU sets of calibrate_core; the choice written
as a policy drop-in.

The imperative shell: checks (model, memory fit, budget, output directory) before anything runs, the memcpy
probe, the interleaved decode bursts (each llama-bench pinned to its candidate's CPUs, in a process group of its
own so that Ctrl-C or SIGTERM leaves nothing running), progress on stderr, and the atomic write of the drop-in.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from . import calibrate_core as core
from .errors import BadInput, Interrupted, TuneError

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
MEMCPY_MIB = 128  # beyond the last-level cache; split among the copiers (≥ 32 MiB each), twice that in use


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


def _kill(proc: subprocess.Popen[str]) -> None:
    """Kill the child's whole process group (it has its own) and reap the child."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def _started(argv: list[str], cpus: set[int], nice: int | None, **popen: Any) -> Iterator[subprocess.Popen[str]]:
    """`argv` in a process group of its own, on `cpus`, at `nice` (None: calibrate's own); killed, whole group,
    when the block is left by an exception (Ctrl-C, SIGTERM, a timeout).

    A group, not a session: with kernel.sched_autogroup_enabled (Debian's and Ubuntu's default) each session is a
    scheduling group of its own, and nice weighs only inside one, so a burst in a session of its own beside the
    load in another ran the same at nice -10 as at 0 (docs/BENCHMARKS.md, threads beside a busy process)."""

    def child() -> None:
        os.sched_setaffinity(0, cpus)
        if nice is not None:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    # A stop signal while the child is being started would leave it running unseen: held until `proc` is known.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        proc = subprocess.Popen(argv, text=True, process_group=0, preexec_fn=child, **popen)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        raise
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        yield proc
    except BaseException:
        _kill(proc)
        raise


def burst(bench_bin: Path, model: Path, cand: core.Candidate, tokens: int, timeout_s: float) -> float:
    """One decode burst of `tokens` tokens on the candidate's CPUs, threads and nice: llama-bench's tok/s."""
    argv = [str(bench_bin), "-m", str(model), "-p", "0", "-n", str(tokens), "-t", str(cand.threads), "-r", "1",
            "-ngl", "0", "-o", "json"]
    try:
        with _started(argv, set(cand.cpus), cand.nice, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise CalibrateError(f"llama-bench ({cand.label()}) ran past {timeout_s:.0f} s and was killed") from None
    try:
        return float(json.loads(out)[0]["avg_ts"])
    except (ValueError, KeyError, IndexError, TypeError):
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise CalibrateError(f"llama-bench ({cand.label()}) exited {proc.returncode}: {last}") from None


LOAD_MARK = "autoglm-tune-calibrate-load"  # in the load's command line, for a person (and a test) to find it
LOAD_SCRIPT = """import os, sys, time
parent, work, period = int(sys.argv[2]), int(sys.argv[3]) / 1000, int(sys.argv[4]) / 1000
while os.getppid() == parent:  # gone within a period of calibrate, even when calibrate was killed
    t = time.perf_counter()
    while time.perf_counter() - t < work:
        pass
    time.sleep(period - work)
"""


@contextlib.contextmanager
def background_load(cpus: set[int]) -> Iterator[subprocess.Popen[str]]:
    """The nice comparison's light load (core.LOAD_TEXT) on `cpus` at nice 0, killed when the block is left."""
    argv = [sys.executable, "-S", "-c", LOAD_SCRIPT, LOAD_MARK, str(os.getpid()), str(core.LOAD_WORK_MS),
            str(core.LOAD_PERIOD_MS)]
    with _started(argv, cpus, 0, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL) as proc:
        try:
            yield proc
        finally:
            _kill(proc)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def can_set_nice(nice: int) -> bool:
    """Whether a child of this process may run at `nice` (lower than its own needs CAP_SYS_NICE): tried."""
    probe = f"import os; os.setpriority(os.PRIO_PROCESS, 0, {nice})"
    return subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, timeout=30).returncode == 0


def progress(err: TextIO, done_s: float, budget_s: int, label: str) -> None:
    width = 30
    filled = min(width, int(width * done_s / budget_s))
    line = f"[{'#' * filled}{'.' * (width - filled)}] {max(0, budget_s - done_s):.0f} s left  {label}"
    if err.isatty():
        err.write(f"\r\033[K{line}")
    else:
        err.write(f"calibrate: {line}\n")
    err.flush()


def rounds_until(bench_bin: Path, model: Path, cands: list[core.Candidate], tokens: int, start: float,
                 phase_end_s: float, budget_s: int, refuse_short: bool, err: TextIO
                 ) -> list[dict[str, float]]:
    """Interleaved rounds of `cands` until decided or the next round would end past `phase_end_s` (seconds since
    `start`). `refuse_short`: BadInput when, after one round, MIN_ROUNDS of them cannot fit."""
    rounds: list[dict[str, float]] = []
    longest = 0.0  # the slowest round so far: a round is begun only when one as slow still fits
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
            return rounds
        if refuse_short and len(rounds) == 1 and elapsed + (core.MIN_ROUNDS - 1) * longest > phase_end_s:
            need = math.ceil((elapsed + (core.MIN_ROUNDS - 1) * longest) * budget_s / phase_end_s) + 1
            raise BadInput(f"--budget {budget_s}s: too short for {core.MIN_ROUNDS} rounds with this model (one round "
                           f"takes {longest:.1f} s); allowed: --budget {need}s or more")
        if elapsed + longest > phase_end_s or len(rounds) >= core.MAX_ROUNDS:
            return rounds


def measure(bench_bin: Path, model: Path, cands: list[core.Candidate], budget_s: int, context_length: int | None,
            plan_nice: int | None, cpus: set[int], err: TextIO
            ) -> tuple[float, list[dict[str, float]], int, core.NiceResult | None, float]:
    """The memcpy probe, a warm-up burst, rounds of the CPU sets, then (unless `plan_nice` is None) rounds of the
    chosen set at the plan's nice and at nice 0 under the background load on `cpus`:
    (memcpy GB/s, rounds, tokens per burst, the nice comparison, seconds taken)."""
    from .bench.machine import memcpy_gbs_on

    start = time.monotonic()
    progress(err, 0, budget_s, "memcpy probe")
    gbs = memcpy_gbs_on(cpus, MEMCPY_MIB)
    warm = burst(bench_bin, model, cands[0], core.MIN_TOKENS, budget_s)  # also brings the model into the page cache
    tokens = core.burst_tokens(warm, context_length)
    n_nice = 0 if plan_nice is None else 2
    cpu_end = core.phase_budget_s(budget_s, len(cands), n_nice)
    rounds = rounds_until(bench_bin, model, cands, tokens, start, cpu_end, budget_s, True, err)
    nice = None
    if plan_nice is not None:
        chosen = next(c for c in cands if c.name == core.decide(cands, rounds, final=True).choice)
        nice_cands = core.nice_candidates(chosen, plan_nice)
        with background_load(cpus) as load:
            nice_rounds = rounds_until(bench_bin, model, nice_cands, tokens, start, budget_s, budget_s, False, err)
            load_s = cpu_seconds(load.pid)
        nice = core.NiceResult(nice_cands, nice_rounds, core.decide(nice_cands, nice_rounds, final=True), load_s)
    if err.isatty():
        err.write("\n")
    return gbs, rounds, tokens, nice, time.monotonic() - start


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
    nice_skipped = core.nice_skipped(default.nice, can_set_nice(min(0, default.nice)), os.geteuid())
    plan_nice = default.nice if nice_skipped is None else None
    n_nice = 0 if plan_nice is None else 2
    least = core.minimum_budget_s(len(cands) + n_nice)
    if budget_s < least:
        what = f"{len(cands)} candidate CPU sets" + (" and 2 nice values" if n_nice else "")
        raise BadInput(f"--budget {budget}: too short to measure {what} in "
                       f"{core.MIN_ROUNDS} rounds; allowed: --budget {least}s or more")
    bench_bin = find_llama_bench(llama_bench, lc.program_of(pol["model"], load_preset(pol["model"]["preset"])))
    st = model_file.stat()
    err = sys.stderr
    err.write(f"calibrate: {len(cands)} candidates on {core.topology(facts.cpu)}:\n")
    for c in cands:
        err.write(f"  {c.label()}\n")
    if nice_skipped is not None:
        err.write(f"calibrate: the nice comparison is skipped: {nice_skipped}\n")
    else:
        err.write(f"calibrate: then the chosen set at nice {plan_nice} and at nice 0 under a light background load "
                  f"({core.LOAD_TEXT})\n")
    gbs, rounds, tokens, nice, elapsed = _interruptible(
        bench_bin, model_file, cands, budget_s, machine.shape.context_length, plan_nice, set(machine.allowed_cpus), err)
    result = core.Result(
        cands=cands, rounds=rounds, decision=core.decide(cands, rounds, final=True), memcpy_gbs=gbs,
        model_path=str(model_file),
        model_bytes=st.st_size, model_mtime_ns=st.st_mtime_ns, topology=core.topology(facts.cpu),
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), host=facts.hostname or "unknown", elapsed_s=elapsed,
        budget_s=budget_s, tokens=tokens, nice=nice, nice_skipped=nice_skipped,
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
                   context_length: int | None, plan_nice: int | None, cpus: set[int], err: TextIO
                   ) -> tuple[float, list[dict[str, float]], int, core.NiceResult | None, float]:
    """`measure`, with SIGTERM and SIGHUP handled as Ctrl-C: the burst running is killed, nothing is written."""

    def stop(signum: int, _frame: Any) -> None:
        raise _Stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return measure(bench_bin, model, cands, budget_s, context_length, plan_nice, cpus, err)
    except (KeyboardInterrupt, _Stop):
        err.write("\n")
        raise Interrupted("calibrate interrupted: the measurement stopped, nothing was written") from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)



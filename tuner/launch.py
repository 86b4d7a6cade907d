"""Launch the model server with the plan's CPU set, threads and priorities; wait until it is ready.

Functional core: `build_spec` turns (process plan, [model] policy, preset, what the machine allows)
into a LaunchSpec — the exact argv, added environment, process settings, memory estimate and
warnings — and `render_unit` turns a spec into a systemd unit. No I/O there.
Imperative shell: `gather` reads the machine, `check_port` probes the port, `run` starts the server,
waits for its health endpoint and supervises it until it exits or is told to stop.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from autoglm_helper.contract import procfs
from autoglm_helper.contract.catalogue import (
    ENV_NAME,
    MODEL_MEMORY_SHARE_MAX,
    MODEL_NICE_RANGE,
    MODEL_OOM_SCORE_ADJ_RANGE,
    cpu_weight,
)
from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from . import gguf_header, model_status, procsettings
from .errors import BadInput, TuneError
from .planner import ProcessPlan
from .policy import AUTO
from .presets import Preset
from .procsettings import ProcessSettings, cpu_mask, cpu_ranges

MIB = 1 << 20
CAP_SYS_ADMIN, CAP_SYS_NICE, CAP_SYS_RESOURCE, CAP_IPC_LOCK = 21, 23, 24, 14
STOP_GRACE_S = 10.0
HELPER_ACTIVATION_FILE = "/usr/share/dbus-1/system-services/io.github.autoglm_tune.Helper1.service"
LOG_TAIL_LINES = 15


class LaunchError(TuneError):
    """The model could not be started, died, or was not ready in time: exit 1."""

    exit_code = 1


# ---------------------------------------------------------------------------------------------------
# functional core


@dataclass(frozen=True)
class Machine:
    """What launch needs to know about the live machine (read by `gather`)."""

    allowed_cpus: tuple[int, ...]  # this process's affinity (bounded by its cgroup cpuset)
    mem_available: int | None  # bytes, MemAvailable
    swap_free: int  # bytes
    memlock_hard: int | None  # bytes; None = unlimited
    cap_eff: int  # effective capability mask
    model_bytes: int | None  # size of the model file (None: no model file)
    shape: gguf_header.ModelShape | None  # from the GGUF header, when the model is a GGUF file
    schedulers: dict[str, str | None]  # disks under the model file → active I/O scheduler
    mem_total: int | None = None  # bytes, MemTotal
    systemd_helper: bool = False  # systemd is PID 1 and the root helper is installed: a transient unit is possible
    cgroup_v2: bool = False  # the unified hierarchy: MemoryLow=/MemoryHigh= act
    memcg_v1: bool = False  # a cgroup v1 memory controller: the model can get its own swappiness
    program_flags: frozenset[str] | None = None  # the long options the server's --help lists; None: not probed


@dataclass(frozen=True)
class MemoryFit:
    model_bytes: int
    kv_bytes: int | None
    context_size: int
    available: int | None
    swap_free: int
    verdict: str  # "fits", "tight" (others must be swapped out), "does not fit", "unknown"

    @property
    def need(self) -> int:
        return self.model_bytes + (self.kv_bytes or 0)

    def message(self) -> str:
        kv = (
            f" + KV cache {_mib(self.kv_bytes)} ({self.context_size} tokens, f16)"
            if self.kv_bytes is not None
            else " (KV cache unknown: not a GGUF file)"
        )
        avail = _mib(self.available) if self.available is not None else "unknown"
        return (
            f"memory: model {_mib(self.model_bytes)}{kv} = {_mib(self.need)} needed; "
            f"MemAvailable {avail}, swap free {_mib(self.swap_free)}: {self.verdict}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_bytes": self.model_bytes,
            "kv_cache_bytes": self.kv_bytes,
            "need_bytes": self.need,
            "available_bytes": self.available,
            "swap_free_bytes": self.swap_free,
            "verdict": self.verdict,
        }


@dataclass(frozen=True)
class LaunchSpec:
    preset: str
    argv: list[str]
    environment: dict[str, str]  # added to the caller's environment
    host: str
    port: int
    health_url: str
    settings: ProcessSettings
    keep_resident: str  # "mlock", "cgroup" or "none", decided
    mmap: bool
    memory: MemoryFit | None
    ready_timeout_s: int
    supervisor: str = "launch"  # "launch" (our child) or "systemd" (a transient unit through the helper)
    memory_low: int = 0  # bytes for MemoryLow= (0: none)
    memory_high: int = 0  # bytes for MemoryHigh= (0: none)
    own_swappiness: int | None = None  # cgroup v1: the model's own memory cgroup gets this swappiness (0)
    mem_total: int | None = None  # bytes, bounds the unit's LimitMEMLOCK=
    cgroup_v2: bool = False  # MemoryLow=/MemoryHigh= act on this host (a unit's comments say so)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    expected_denials: list[str] = field(default_factory=list)  # for --dry-run; a launch reports the real ones

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "argv": self.argv,
            "environment": self.environment,
            "host": self.host,
            "port": self.port,
            "health_url": self.health_url,
            "process": self.settings.to_dict(),
            "supervisor": self.supervisor,
            "keep_resident": self.keep_resident,
            "keep_resident_how": keep_resident_how(self),
            "memory_low": self.memory_low,
            "own_swappiness": self.own_swappiness,
            "memory_high": self.memory_high,
            "mmap": self.mmap,
            "memory": self.memory.to_dict() if self.memory else None,
            "ready_timeout_s": self.ready_timeout_s,
            "warnings": self.warnings,
            "expected_denials": self.expected_denials,
            "notes": self.notes,
        }


def _mib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / MIB:.0f} MiB"


def memory_fit(machine: Machine, context_size: int) -> MemoryFit | None:
    """Model file + KV-cache estimate against MemAvailable and swap. None without a model file."""
    if machine.model_bytes is None:
        return None
    kv = machine.shape.kv_cache_bytes(context_size) if machine.shape else None
    need = machine.model_bytes + (kv or 0)
    if machine.mem_available is None:
        verdict = "unknown"
    elif need <= machine.mem_available:
        verdict = "fits"
    elif need <= machine.mem_available + machine.swap_free:
        verdict = "tight"
    else:
        verdict = "does not fit"
    return MemoryFit(machine.model_bytes, kv, context_size, machine.mem_available, machine.swap_free, verdict)


def _has(cap_eff: int, cap: int) -> bool:
    return bool(cap_eff >> cap & 1)


def _supervisor(wanted: str, machine: Machine) -> str:
    if wanted == "systemd" and not machine.systemd_helper:
        raise BadInput(
            '[model] supervisor = "systemd": needs systemd as PID 1 and the root helper installed '
            '(autoglm-tune system install); allowed: "launch" or "auto"'
        )
    return "systemd" if wanted == "systemd" or (wanted == AUTO and machine.systemd_helper) else "launch"


def _keep_resident(wanted: str, machine: Machine, fit: MemoryFit | None, supervisor: str) -> tuple[str, str | None]:
    """("mlock" | "cgroup" | "none", a warning or note). Each keeps the weights out of swap, where they do not
    compress and every token would pay for the swap-in (research kernel-and-platform.md §9). mlock does not
    cover the CPU-repacked copy of Q4_0 weights (docs/BENCHMARKS.md); the model's own cgroup protects all of
    it — MemoryLow= in its unit on cgroup v2, its own memory cgroup with swappiness 0 on cgroup v1 — so that
    is preferred where it acts."""
    if wanted == "none" or fit is None:
        return "none", None
    in_unit = supervisor == "systemd"
    cgroup_acts = machine.cgroup_v2 if in_unit else machine.memcg_v1
    if wanted == "cgroup" or (wanted == AUTO and cgroup_acts):
        if not cgroup_acts:
            where = "MemoryLow= needs cgroup v2" if in_unit else "a child of launch needs a cgroup v1 memory controller"
            return "none", f"keep_resident = cgroup has no effect here ({where}); the server runs unprotected"
        return "cgroup", None
    # a unit gets LimitMEMLOCK= from systemd (the helper allows up to 3/4 of RAM)
    lockable = (
        in_unit
        or _has(machine.cap_eff, CAP_IPC_LOCK)
        or machine.memlock_hard is None
        or machine.memlock_hard >= fit.need
    )
    limit = "unlimited" if machine.memlock_hard is None else _mib(machine.memlock_hard)
    if wanted == "mlock":
        if lockable:
            return "mlock", None
        return "mlock", (
            f"keep_resident = mlock: the hard RLIMIT_MEMLOCK is {limit}, below the {_mib(fit.need)} to lock, and "
            "this process lacks CAP_IPC_LOCK; the server will run unlocked (raise LimitMEMLOCK=, e.g. launch --unit)"
        )
    if not lockable:
        return "none", f"keep_resident = auto: not locking the model: the hard RLIMIT_MEMLOCK is {limit}"
    if fit.verdict != "fits":
        return "none", f"keep_resident = auto: not locking the model: it does not fit in free memory ({fit.verdict})"
    return "mlock", None


def helper_bounds(nice: int, oom_score_adj: int) -> tuple[int, int, list[str]]:
    """nice and oom_score_adj within what the root helper grants (catalogue), with a warning for each cut."""
    warnings = []
    if nice < MODEL_NICE_RANGE[0]:
        warnings.append(f"nice = {nice} is below the root helper's floor; the model gets {MODEL_NICE_RANGE[0]}")
        nice = MODEL_NICE_RANGE[0]
    if oom_score_adj < MODEL_OOM_SCORE_ADJ_RANGE[0]:
        warnings.append(
            f"oom_score_adj = {oom_score_adj} is below the root helper's floor; the model gets "
            f"{MODEL_OOM_SCORE_ADJ_RANGE[0]}"
        )
        oom_score_adj = MODEL_OOM_SCORE_ADJ_RANGE[0]
    return nice, oom_score_adj, warnings


def _memory_low(fit: MemoryFit | None, keep: str, machine: Machine, warnings: list[str]) -> int:
    """MemoryLow= for keep_resident cgroup: model + KV cache, at most what the helper grants."""
    if fit is None or keep != "cgroup" or not machine.cgroup_v2:
        return 0
    if machine.mem_total and fit.need > machine.mem_total * MODEL_MEMORY_SHARE_MAX:
        cap = int(machine.mem_total * MODEL_MEMORY_SHARE_MAX)
        warnings.append(f"MemoryLow= is cut to {_mib(cap)} (3/4 of RAM) from the {_mib(fit.need)} the model needs")
        return cap
    return fit.need


def predicted_denials(s: ProcessSettings, cap_eff: int) -> list[str]:
    """Settings this process is expected to be refused (research §5), for --dry-run."""
    out = []
    if s.nice < 0 and not _has(cap_eff, CAP_SYS_NICE):
        out.append(
            f"nice = {s.nice} will probably be refused before exec: lowering nice needs CAP_SYS_NICE or RLIMIT_NICE; "
            "launch then asks the root helper"
        )
    if s.oom_score_adj < 0 and not _has(cap_eff, CAP_SYS_RESOURCE):
        out.append(
            f"oom_score_adj = {s.oom_score_adj} will be refused before exec: lowering it below 0 needs "
            "CAP_SYS_RESOURCE, which this process lacks; launch then asks the root helper"
        )
    if s.io_class == "realtime" and not _has(cap_eff, CAP_SYS_ADMIN):
        out.append("io_class = realtime will be refused: it needs CAP_SYS_ADMIN")
    return out


_JINJA = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


def render(template: str, variables: dict[str, Any], where: str) -> str:
    """Render one jinja2 template; any template problem is BadInput naming where it is."""
    allowed = f"jinja2 with the variables {', '.join(sorted(variables))}"
    try:
        return _JINJA.from_string(template).render(variables)
    except TemplateSyntaxError as exc:
        raise BadInput(
            f"{where} = {json.dumps(template)}: template syntax error: {exc.message}; allowed: {allowed}"
        ) from None
    except UndefinedError as exc:
        raise BadInput(f"{where} = {json.dumps(template)}: {exc.message}; allowed: {allowed}") from None
    except TemplateError as exc:
        raise BadInput(f"{where} = {json.dumps(template)}: template error: {exc}; allowed: {allowed}") from None


def _render_args(templates: list[str] | tuple[str, ...], variables: dict[str, Any], where: str) -> list[str]:
    """Render each argument; one whose template has a {% %} block and renders empty is left out."""
    out = []
    for i, t in enumerate(templates):
        text = render(t, variables, f"{where}[{i}]")
        if text or "{%" not in t:
            out.append(text)
    return out


HELP_FLAG_MIN = 5  # fewer long options than this in --help: not a help text we can judge by
HELP_BYTES_MAX = 1 << 20


def help_flags(text: str) -> frozenset[str] | None:
    """The long options a --help text lists ("--load-mode", "--no-mmap"); None when it lists too few to be one
    (some servers print nothing, or an error, for --help)."""
    import re

    flags = frozenset(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9_-]*", text))
    return flags if len(flags) >= HELP_FLAG_MIN else None


def probe_flags(program: str, timeout: float = 20.0, args: tuple[str, ...] = ("--help",)) -> frozenset[str] | None:
    """Run `program ARGS` (`llama-server --help`, `python3 -m llama_cpp.server --help`; bounded in time and size)
    and read its long options. llama.cpp renames flags
    between builds (--no-mmap and --mlock became --load-mode), and some builds print help and exit 0 on an
    unknown flag, which looks like success: the flags are checked against this list before the server starts."""
    try:
        done = subprocess.run([program, *args], stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return help_flags((done.stdout[:HELP_BYTES_MAX] + done.stderr[:HELP_BYTES_MAX]).decode(errors="replace"))


def server_flags(listed: frozenset[str] | None, preset: Preset) -> frozenset[str] | None:
    """The probed flags, when the help text is this preset's server's: it lists at least half of the long options
    the preset always passes (--model, --port, …). Otherwise (a wrapper script, a test double, another program)
    the build is not judged by it: None, as when nothing was probed."""
    fixed = {t for t in preset.command if t.startswith("--") and "{" not in t}
    if listed is None or not fixed or 2 * len(fixed & listed) < len(fixed):
        return None
    return listed


def missing_flag(argv: list[str], flags: frozenset[str] | None, program: str, preset: Preset) -> None:
    """BadInput for the first long option in `argv` that the program's help (the preset's probe) does not list."""
    if flags is None:
        return
    asked = " ".join([program, *(preset.probe or ("--help",))])
    for arg in argv[1:]:
        name = arg.split("=", 1)[0]
        if name.startswith("--") and name not in flags:
            raise BadInput(
                f"[model] program: {program} does not take {name} (`{asked}` does not list it: this {preset.name} "
                "build or release lacks it); allowed: a build whose help lists it, or [model] args and a preset "
                "that match this build"
            )


def program_of(model: dict[str, Any], preset: Preset) -> str:
    """The server program as configured: [model] program, or the preset's for "auto"."""
    return preset.program if model["program"] == AUTO else model["program"]


def url_host(host: str) -> str:
    """The address a client on this machine uses to reach a server listening on `host`."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def build_spec(
    process: ProcessPlan,
    model: dict[str, Any],
    preset: Preset,
    machine: Machine,
    command: list[str] | None = None,
) -> LaunchSpec:
    """The exact launch: argv, added environment, process settings, memory estimate, warnings. Pure."""
    outside = sorted(set(process.cpus) - set(machine.allowed_cpus))
    if outside:
        raise BadInput(
            f"[process] cpus: CPUs {outside} are outside this process's CPU set; "
            f"allowed: a subset of {cpu_ranges(machine.allowed_cpus)}"
        )
    warnings: list[str] = []
    notes = list(process.reasons)
    fit = memory_fit(machine, model["context_size"]) if model["memory_fit"] != "off" else None
    if fit is not None:
        if fit.verdict == "does not fit" and model["memory_fit"] == "refuse":
            raise LaunchError(f'{fit.message()}; refused by [model] memory_fit = "refuse"')
        (warnings if fit.verdict in ("tight", "does not fit") else notes).append(fit.message())
    trained = machine.shape.context_length if machine.shape else None
    if trained is not None and model["context_size"] > trained:
        warnings.append(
            f"[model] context_size = {model['context_size']} exceeds the {trained} tokens the model was trained "
            "for; output degrades beyond it"
        )
    supervisor = _supervisor(model["supervisor"], machine)
    keep, why = _keep_resident(model["keep_resident"], machine, fit, supervisor)
    if why:
        (warnings if model["keep_resident"] != AUTO else notes).append(why)
    memory_high = model["memory_high_mib"] * MIB
    if memory_high and supervisor != "systemd":
        warnings.append(
            "[model] memory_high_mib applies to a systemd unit only (supervisor systemd, or launch --unit); "
            "the server runs without it"
        )
    if memory_high and machine.mem_total and memory_high > machine.mem_total:
        warnings.append(f"[model] memory_high_mib is above MemTotal; MemoryHigh= is set to {_mib(machine.mem_total)}")
        memory_high = machine.mem_total
    nice, oom = process.nice, process.oom_score_adj
    if supervisor == "systemd":  # the helper grants a unit no more than its bounds
        nice, oom, clamped = helper_bounds(nice, oom)
        warnings += clamped
    mmap = True if model["mmap"] == AUTO else model["mmap"]
    flags = server_flags(machine.program_flags, preset)
    settings = ProcessSettings(
        cpus=tuple(process.cpus),
        threads=process.threads,
        sched_policy=process.sched_policy,
        nice=nice,
        io_class=process.io_class,
        io_priority=process.io_priority,
        oom_score_adj=oom,
        raise_memlock=keep == "mlock" and supervisor == "launch",
    )
    model_path = model["model_path"]
    variables: dict[str, Any] = {
        "preset": preset.name,
        "program": program_of(model, preset),
        "model_path": model_path,
        "model_name": Path(model_path).name.removesuffix(".gguf"),
        "context_size": model["context_size"],
        "host": model["host"],
        "port": model["port"],
        "url_host": url_host(model["host"]),
        "threads": process.threads,
        "cpus": list(process.cpus),
        "cpu_list": cpu_ranges(process.cpus),
        "cpu_mask": cpu_mask(process.cpus),
        "mlock": keep == "mlock",
        "mmap": mmap,
        "sched_policy": process.sched_policy,
        "nice": process.nice,
        "io_class": process.io_class,
        "io_priority": process.io_priority,
        "oom_score_adj": process.oom_score_adj,
        "flags": sorted(flags or ()),
    }
    if command:
        argv = _render_args(command, variables, "launch -- CMD")
    else:
        argv = _render_args(preset.command, variables, f"preset {preset.name} command")
        argv += _render_args(model["args"], variables, "[model] args")
        missing_flag(argv, flags, variables["program"], preset)
    if not argv or not argv[0]:
        raise BadInput("the command is empty; allowed: a program and its arguments")
    environment = {
        k: render(v, variables, f"preset {preset.name} [environment] {k}") for k, v in preset.environment.items()
    }
    environment |= {k: render(v, variables, f"[model] environment {k}") for k, v in model["environment"].items()}
    health = render(preset.health, variables, f"preset {preset.name} health")
    note = procsettings.ioprio_note(process.io_class, machine.schedulers, model_path) if model_path else None
    if note:
        warnings.append(note)
    return LaunchSpec(
        preset=preset.name,
        argv=argv,
        environment=environment,
        host=model["host"],
        port=model["port"],
        health_url=health,
        settings=settings,
        keep_resident=keep,
        mmap=mmap,
        memory=fit,
        ready_timeout_s=model["ready_timeout_s"],
        supervisor=supervisor,
        memory_low=_memory_low(fit, keep, machine, warnings) if supervisor == "systemd" else 0,
        own_swappiness=0 if keep == "cgroup" and supervisor == "launch" else None,
        memory_high=memory_high,
        mem_total=machine.mem_total,
        cgroup_v2=machine.cgroup_v2,
        warnings=warnings,
        notes=notes,
        expected_denials=predicted_denials(settings, machine.cap_eff) if supervisor == "launch" else [],
    )


def systemd_quote(word: str) -> str:
    """One ExecStart= argument: specifiers (%) and variable expansion ($) escaped, quoted when needed."""
    text = word.replace("%", "%%").replace("$", "$$")
    if text and not any(c in text for c in " \t\"'\\;"):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def keep_resident_how(spec: LaunchSpec) -> str:
    """What the decided keep_resident does on this host, in words: the dry-run and the unit's comment say the same."""
    if spec.keep_resident == "mlock":
        return "the server locks its weights in RAM (" + (
            "LimitMEMLOCK=infinity in the unit)" if spec.supervisor == "systemd" else "RLIMIT_MEMLOCK raised first)")
    if spec.keep_resident == "cgroup":
        if spec.memory_low:
            return f"MemoryLow={spec.memory_low}: cgroup v2 reclaims the rest of the system first"
        return "a memory cgroup of its own with swappiness 0 (cgroup v1, through the root helper)"
    return "nothing keeps the model out of swap"


def render_unit(spec: LaunchSpec, template: str, user: str | None = None) -> str:
    """The persistent model service unit for `spec` (jinja2 `template`, policies/model.service.j2). Pure.
    `user`: who the server runs as (the user who rendered it; None for root), as `launch` runs it as its caller."""
    s = spec.settings
    variables = {
        "user": user,
        "description": f"Local LLM server ({spec.preset}) with the autoglm-tune plan",
        "exec_start": " ".join(systemd_quote(a) for a in spec.argv),
        "environment": [systemd_quote(f"{k}={v}") for k, v in sorted(spec.environment.items())],
        "cpu_affinity": cpu_ranges(s.cpus),
        "sched_policy": s.sched_policy,
        "nice": s.nice,
        "cpu_weight": cpu_weight(s.nice),
        "io_class": s.io_class,
        "io_priority": s.io_priority,
        "oom_score_adj": s.oom_score_adj,
        "mlock": spec.keep_resident == "mlock",
        "keep_resident": spec.keep_resident,
        "keep_resident_how": keep_resident_how(spec),
        "memory_low": spec.memory_low or None,  # the transient unit's decision (_memory_low): cgroup v2 only
        "memory_high": spec.memory_high or None,
        "cgroup_v2": spec.cgroup_v2,
        "health_url": spec.health_url,
    }
    return render(template, variables, "policies/model.service.j2")


def unit_request(spec: LaunchSpec, cwd: str, inherited: dict[str, str]) -> dict[str, Any]:
    """What the root helper's StartModel gets: the transient unit's command and settings, run in `cwd` with the
    launcher's environment `inherited` plus the spec's, as a child would be. Pure."""
    s = spec.settings
    memlock = 0
    if spec.keep_resident == "mlock" and spec.memory is not None:
        # twice the estimate: the CPU repack of Q4_0 weights is a second copy (docs/LAUNCH.md)
        memlock = 2 * spec.memory.need
        if spec.mem_total:
            memlock = min(memlock, int(spec.mem_total * MODEL_MEMORY_SHARE_MAX))
    return {
        "argv": spec.argv,
        "environment": {k: v for k, v in inherited.items() if ENV_NAME.fullmatch(k) and "\0" not in v}
        | spec.environment,
        "working_directory": cwd,
        "port": spec.port,
        "cpus": list(s.cpus),
        "sched_policy": s.sched_policy,
        "nice": s.nice,
        "io_class": s.io_class,
        "io_priority": s.io_priority,
        "oom_score_adj": s.oom_score_adj,
        "memory_low": spec.memory_low,
        "memory_high": spec.memory_high,
        "memlock": memlock,
    }


def spec_text(spec: LaunchSpec) -> str:
    """--dry-run without --json: what would run, for a person."""
    s = spec.settings
    lines = [
        f"preset    {spec.preset}",
        f"argv      {' '.join(systemd_quote(a) for a in spec.argv)}",
        *(f"env       {k}={v}" for k, v in sorted(spec.environment.items())),
        f"cpus      {cpu_ranges(s.cpus)} (mask {cpu_mask(s.cpus)}), threads {s.threads}",
        f"sched     {s.sched_policy}, nice {s.nice}, io {s.io_class}/{s.io_priority}, oom_score_adj {s.oom_score_adj}",
        "runs as   " + ("a transient systemd unit (root helper)" if spec.supervisor == "systemd" else "our child"),
        f"memory    keep_resident {spec.keep_resident} ({keep_resident_how(spec)}), mmap {str(spec.mmap).lower()}"
        + (f", MemoryLow {_mib(spec.memory_low)}" if spec.memory_low else "")
        + (f", MemoryHigh {_mib(spec.memory_high)}" if spec.memory_high else ""),
        f"ready     {spec.health_url} within {spec.ready_timeout_s} s",
        *(f"note      {n}" for n in spec.notes),
        *(f"warning   {w}" for w in spec.warnings + spec.expected_denials),
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# imperative shell


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes; empty when it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            return {name: kib * 1024 for name, kib in procfs.parse_meminfo(fh.read()).items()}
    except OSError:
        return {}


def _cap_eff() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def check_model_path(model: dict[str, Any], preset: Preset, command: list[str] | None) -> Path | None:
    """The model file to check and estimate, or None; BadInput when it is required and missing."""
    path = model["model_path"]
    if not path:
        if preset.model_file and not command:
            raise BadInput(f"[model] model_path is not set; allowed: the path of the model file for {preset.name}")
        return None
    p = Path(path)
    if not p.exists():
        raise BadInput(f"[model] model_path = {json.dumps(path)}: no such file; allowed: an existing model file")
    if not (p.is_file() or p.is_dir()) or not os.access(p, os.R_OK):
        raise BadInput(f"[model] model_path = {json.dumps(path)}: not a readable file; allowed: a readable model file")
    return p


def gather(model_file: Path | None) -> Machine:
    """Read what launch needs from the live machine."""
    mem = _meminfo()
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    size = shape = None
    schedulers: dict[str, str | None] = {}
    if model_file is not None:
        if model_file.is_dir():
            size = sum(f.stat().st_size for f in model_file.rglob("*") if f.is_file())
        else:
            size = model_file.stat().st_size
            with model_file.open("rb") as fh:
                is_gguf = fh.read(4) == b"GGUF"
            if is_gguf:
                shape = gguf_header.model_shape(gguf_header.read_metadata(model_file), str(model_file))
        schedulers = procsettings.schedulers_of(str(model_file))
    return Machine(
        allowed_cpus=tuple(sorted(os.sched_getaffinity(0))),
        mem_available=mem.get("MemAvailable"),
        swap_free=mem.get("SwapFree", 0),
        memlock_hard=None if hard == resource.RLIM_INFINITY else hard,
        cap_eff=_cap_eff(),
        model_bytes=size,
        shape=shape,
        schedulers=schedulers,
        mem_total=mem.get("MemTotal"),
        systemd_helper=os.path.isdir("/run/systemd/system") and os.path.exists(HELPER_ACTIVATION_FILE),
        cgroup_v2=os.path.exists("/sys/fs/cgroup/cgroup.controllers"),
        memcg_v1=os.path.exists("/sys/fs/cgroup/memory/memory.swappiness"),
    )


def resolve_program(spec: LaunchSpec, which: Callable[[str], str | None], required: bool = True) -> LaunchSpec:
    """argv[0] as an absolute path (the exact argv, and systemd wants one). Not found: BadInput, or
    for --dry-run (`required` False) a warning."""
    found = which(spec.argv[0])
    if found is not None:
        return replace(spec, argv=[os.path.abspath(found), *spec.argv[1:]])
    problem = f"[model] program: {json.dumps(spec.argv[0])} is not an executable on PATH"
    if required:
        raise BadInput(f"{problem}; allowed: a program name on PATH or its full path")
    return replace(spec, warnings=[*spec.warnings, problem])


def check_port(spec: LaunchSpec) -> None:
    """BadInput when something already listens on the server's address."""
    if port_in_use(spec.host, spec.port):
        raise BadInput(f"[model] port = {spec.port}: {spec.host}:{spec.port} is already in use; allowed: a free port")


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on host:port (bind fails with EADDRINUSE)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise BadInput(f"[model] host = {json.dumps(host)}: cannot listen there ({exc.strerror})") from None
    return False


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 16384))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    tail = text.splitlines()[-lines:]
    return "\n".join(f"  | {line}" for line in tail) if tail else "  | (empty log)"


def _healthy(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError):
        return False


class _Stop:
    """SIGINT/SIGTERM/SIGHUP set a flag; the supervising loop stops the server."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous = {s: signal.signal(s, self._set) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def _set(self, signum: int, _frame: object) -> None:
        self.signum = signum

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def stop_group(proc: Any, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM to the server's process group, SIGKILL after a grace period; reap it."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # helpers the server forked and left in its group
        os.killpg(proc.pid, signal.SIGKILL)


def as_child(spec: LaunchSpec) -> LaunchSpec:
    """The same launch without a unit (the helper did not answer): the unit-only memory settings fall away."""
    keep = "mlock" if spec.keep_resident == "mlock" else "none"
    settings = replace(spec.settings, raise_memlock=keep == "mlock")
    return replace(spec, supervisor="launch", keep_resident=keep, memory_low=0, memory_high=0, settings=settings,
                   own_swappiness=None)


def _open_log(log_path: Path) -> Any:
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        return log_path.open("wb")
    except OSError as exc:
        raise BadInput(f"--log {log_path}: cannot write ({exc.strerror})") from None


class _Child:
    """The server as our child process."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.pid = proc.pid

    def exited(self) -> str | None:
        rc = self.proc.poll()
        return None if rc is None else f"exited with status {rc}"


class _UnitMain:
    """The server as the main process of a transient unit: not our child, so watched through a pidfd."""

    def __init__(self, pid: int, unit: str) -> None:
        self.pid = pid
        self.unit = unit
        self.pidfd = os.pidfd_open(pid)

    def exited(self) -> str | None:
        if select.select([self.pidfd], [], [], 0)[0]:
            return f"exited ({self.unit}; systemctl status {self.unit})"
        return None

    def close(self) -> None:
        os.close(self.pidfd)


def run(spec: LaunchSpec, log_path: Path, json_out: bool, out: TextIO, err: TextIO) -> int:
    """Start the server as our child, wait for readiness, supervise until it exits or a signal asks it to stop.
    What this process may not set (negative nice, oom_score_adj) is asked of the root helper."""
    check_port(spec)
    log = _open_log(log_path)
    read_fd, write_fd = os.pipe()
    stop = _Stop()
    proc = None
    try:
        with log:
            try:
                proc = subprocess.Popen(
                    spec.argv,
                    env={**os.environ, **spec.environment},
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=procsettings.Applier(spec.settings, write_fd),
                    process_group=0,
                )
            except OSError as exc:
                os.close(read_fd)
                raise BadInput(f"[model] program: cannot run {spec.argv[0]} ({exc.strerror})") from None
            finally:
                os.close(write_fd)
        with os.fdopen(read_fd, "rb") as reports:
            denied = {r["setting"]: r["warning"] for r in map(json.loads, reports.read().decode().splitlines())}
        _raise_through_helper(proc.pid, spec.settings, denied, err, spec.own_swappiness)
        return _supervise(spec, _Child(proc), stop, log_path, json_out, out, err)
    finally:
        if proc is not None:
            stop_group(proc)
        stop.restore()


PRIVILEGED = ("nice", "oom_score_adj")


def _raise_through_helper(pid: int, settings: ProcessSettings, denied: dict[str, str], err: TextIO,
                          own_swappiness: int | None) -> None:
    """What only root may do for the server's PID is asked of the root helper right after exec (its own process,
    within the helper's bounds): a negative nice or oom_score_adj this process was refused, and on cgroup v1 a
    memory cgroup of its own with `own_swappiness`. Whatever still cannot be set is said plainly."""
    wanted = {k: getattr(settings, k) for k in PRIVILEGED if k in denied and getattr(settings, k) < 0}
    for setting, text in denied.items():
        if setting not in wanted:
            _warn(text, err)
    nice, oom, clamped = helper_bounds(wanted.get("nice", 0), wanted.get("oom_score_adj", 0))
    wanted = {k: v for k, v in (("nice", nice), ("oom_score_adj", oom)) if k in wanted}
    if own_swappiness is not None:
        wanted["swappiness"] = own_swappiness
        denied["swappiness"] = "keep_resident = cgroup: the model's own memory cgroup (swappiness 0) is not set"
    if not wanted:
        return
    for text in clamped:
        _warn(text, err)
    from . import helper_client

    try:
        report = helper_client.set_process(pid, wanted, dry_run=False)
    except TuneError as exc:
        for setting in wanted:
            _warn(f"{denied[setting]}; the root helper did not set it either: {exc}", err)
        return
    for text in report["warnings"]:
        _warn(text, err)


def run_unit(spec: LaunchSpec, log_path: Path, json_out: bool, out: TextIO, err: TextIO) -> int:
    """Have the root helper start the server as a transient unit run as this user, then wait and supervise
    as `run` does; stopping the launcher stops the unit. The log file is ours: the helper passes its
    descriptor on to systemd."""
    from . import helper_client

    check_port(spec)
    log = _open_log(log_path)
    stop = _Stop()  # before the start: a Ctrl-C during the start job still stops the unit afterwards
    report: dict[str, Any] = {}
    server = None
    try:
        with log:
            try:
                report = helper_client.start_model(unit_request(spec, os.getcwd(), dict(os.environ)), log.fileno())
            except helper_client.FailedRolledBack as exc:  # nothing to roll back here: the unit did not start
                raise LaunchError(f"{exc}; last lines of {log_path}:\n{log_tail(log_path)}") from None
        for text in report["warnings"]:
            _warn(text, err)
        for text in report["notes"]:
            err.write(f"autoglm-tune: {text}\n")
        try:
            server = _UnitMain(report["pid"], report["unit"])
        except ProcessLookupError:
            raise LaunchError(f"the model server in {report['unit']} exited at once; last lines of {log_path}:\n"
                              f"{log_tail(log_path)}") from None
        return _supervise(spec, server, stop, log_path, json_out, out, err)
    finally:
        if report:
            try:
                helper_client.stop_model(report["unit"])
            except TuneError as exc:
                _warn(f"could not stop {report['unit']}: {exc}", err)
        if server is not None:
            server.close()
        stop.restore()


def _supervise(spec: LaunchSpec, server: Any, stop: _Stop, log_path: Path, json_out: bool, out: TextIO,
               err: TextIO) -> int:
    """Wait for readiness, then watch the server; `status` finds it through the record beside the log."""
    _wait_ready(spec, server, stop, log_path, err)
    if stop.signum is not None:
        return 0
    info = {"event": "ready", "pid": server.pid, "url": spec.health_url, "log": str(log_path)}
    if isinstance(server, _UnitMain):
        info["unit"] = server.unit
    if json_out:
        out.write(json.dumps(info) + "\n")
    else:
        where = f"pid {server.pid}" + (f", unit {server.unit}" if isinstance(server, _UnitMain) else "")
        out.write(f"autoglm-tune: model ready: {spec.health_url} ({where}, log {log_path}); Ctrl-C stops it\n")
    out.flush()
    record = model_status.record_path(log_path)
    try:
        model_status.write_record(record, info)
    except OSError as exc:
        _warn(f"status will not find the model: cannot write {record} ({exc.strerror})", err)
    try:
        while stop.signum is None:
            gone = server.exited()
            if gone is not None:
                raise LaunchError(f"the model server {gone}; last lines of {log_path}:\n{log_tail(log_path)}")
            time.sleep(0.5)
    finally:
        record.unlink(missing_ok=True)
    return 0


def _warn(text: str, err: TextIO) -> None:
    err.write(f"autoglm-tune: warning: {text}\n")
    err.flush()


def _wait_ready(spec: LaunchSpec, server: Any, stop: _Stop, log_path: Path, err: TextIO) -> None:
    start = time.monotonic()
    tty = err.isatty()
    while stop.signum is None:
        gone = server.exited()
        if gone is not None:
            raise LaunchError(
                f"the model server {gone} before it was ready; "
                f"last lines of {log_path}:\n{log_tail(log_path)}"
            )
        if _healthy(spec.health_url):
            break
        waited = time.monotonic() - start
        if waited > spec.ready_timeout_s:
            raise LaunchError(
                f"the model server was not ready after {spec.ready_timeout_s} s ([model] ready_timeout_s); "
                f"stopped it; last lines of {log_path}:\n{log_tail(log_path)}"
            )
        if tty:
            err.write(f"\rautoglm-tune: waiting for {spec.health_url} … {waited:.0f} s / {spec.ready_timeout_s} s")
            err.flush()
        time.sleep(0.25)
    if tty:
        err.write("\r\033[K")
        err.flush()


def default_log() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "autoglm-tune" / "model.log"


def print_warnings(spec: LaunchSpec, err: TextIO = sys.stderr) -> None:
    for w in spec.warnings:
        _warn(w, err)

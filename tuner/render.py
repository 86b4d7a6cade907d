"""Text, JSON and TOML views of facts and plans. Pure: strings in, strings out."""

from __future__ import annotations

import json
from typing import Any

import typer
from autoglm_helper.contract.plan_schema import Change

from .collect import tuner_unit
from .facts import Facts
from .planner import Plan


def _value(v: object) -> str:
    if v is None:
        return "(none)"
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def _drop_none(obj: Any) -> Any:
    """TOML has no null: leave such keys out."""
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj]
    return obj


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


def plan_toml(plan: Plan) -> str:
    import tomli_w  # lazy: only this output needs it

    return tomli_w.dumps(_drop_none(plan.to_dict()))


def _gib(kib: int | None) -> str:
    return "unknown" if kib is None else f"{kib / 1024 / 1024:.1f} GiB"


def facts_text(f: Facts) -> str:
    cores = len({c.core for c in f.cpu.cpus})
    kinds = sorted({c.kind for c in f.cpu.cpus} - {"standard"})
    lines = [
        f"host        {f.hostname or 'unknown'}   kernel {f.kernel or 'unknown'}",
        f"cpu         {len(f.cpu.online)} online CPUs, {cores} physical cores"
        + (f", hybrid ({', '.join(kinds)})" if kinds else "")
        + (f"   {f.cpu.model}" if f.cpu.model else ""),
        f"memory      {_gib(f.memory.total_kib)} total, {_gib(f.memory.available_kib)} available"
        + (f", PSI some avg60 {f.memory.psi_some.avg60:.2f}" if f.memory.psi_some else ", PSI unknown"),
    ]
    if f.swaps:
        for a in f.swaps:
            lines.append(
                f"swap        {a.area} ({a.type} on {a.device or '?'}, {a.device_class}) "
                f"{a.size_kib // 1024} MiB, {a.used_kib // 1024} MiB used, priority {a.priority}"
            )
    else:
        lines.append("swap        none")
    z = f.zswap
    if z.present:
        state = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in sorted(f.knobs.items()) if k.startswith("zswap."))
        lines.append(f"zswap       {state}; compressors here: {', '.join(z.compressors_available) or 'none'}")
    else:
        lines.append("zswap       not in this kernel")
    vm = ", ".join(f"{k[3:]}={v}" for k, v in sorted(f.knobs.items()) if k.startswith("vm."))
    lines.append(f"vm          {vm}")
    lines.append(f"thp         {', '.join(f'{k}={v}' for k, v in sorted(f.thp.items())) or 'unknown'}")
    lines.append(f"cgroup      {f.cgroup.layout}, memory controller {f.cgroup.memory_controller or 'none'}")
    source = "live over D-Bus" if any(u.source == "systemd" for u in f.units) else "from unit files"
    lines.append(f"systemd     {'running' if f.systemd_running else 'not PID 1'}, {len(f.units)} units read {source}")
    units = {u.name: u for u in f.units}
    for t in f.tuners:
        unit = units.get(tuner_unit(t.name) or "")
        state = f", {unit.name} {unit.state}{', ' + unit.active if unit.active else ''}" if unit else ""
        lines.append(f"tuner       {t.name} ({t.evidence}{state}): {'; '.join(t.conflicts_on)}")
    if (cal := f.calibration) is not None:
        nice = f", nice {cal.nice}" if cal.nice is not None else ""
        lines.append(f"calibrated  {cal.date} on {cal.host} with {cal.model_path}: CPUs {cal.cpus}, {cal.threads} "
                     f"threads{nice} ({cal.source}; " + (f"stale: {cal.stale_because})" if cal.stale else "fresh)"))
    for n in f.notes:
        lines.append(f"note        {n}")
    return "\n".join(lines) + "\n"


def _change_line(c: Change, color: bool) -> str:
    arrow = f"{_value(c.current)} → {_value(c.target)}"
    if color:
        arrow = f"{typer.style(_value(c.current), fg='red')} → {typer.style(_value(c.target), fg='green')}"
    return f"  {c.subject:<34} {arrow}"


def plan_text(plan: Plan, color: bool = False) -> str:
    lines = [f"plan for {plan.host or 'this host'} (policy: {', '.join(plan.policy_sources)})"]
    if plan.changes:
        lines.append("changes:")
        for c in plan.changes:
            lines.append(_change_line(c, color))
            lines.append(f"      {c.persistence}: {c.reason}")
    else:
        lines.append("changes: none, the machine matches the plan")
    if plan.unchanged:
        lines.append("already in place: " + ", ".join(f"{c.subject}={_value(c.target)}" for c in plan.unchanged))
    p = plan.process
    lines.append(
        f"inference process: CPUs {','.join(map(str, p.cpus))}, {p.threads} threads, "
        f"{p.sched_policy}, nice {p.nice}, io {p.io_class}/{p.io_priority}, oom_score_adj {p.oom_score_adj}"
    )
    lines += [f"      {r}" for r in p.reasons]
    lines += [f"conflict: {c}" for c in plan.conflicts]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines) + "\n"


def diff_text(plan: Plan, color: bool = False) -> str:
    if plan.in_sync:
        return f"in sync: {len(plan.unchanged)} managed settings already match the plan\n"
    lines = [f"{len(plan.changes)} setting(s) differ from the plan:"]
    for c in plan.changes:
        lines.append(_change_line(c, color) + f"   ({c.reason})")
    lines += [f"conflict: {c}" for c in plan.conflicts]
    return "\n".join(lines) + "\n"


def diff_json(plan: Plan) -> dict[str, Any]:
    return {
        "in_sync": plan.in_sync,
        "changes": [{"subject": c.subject, **c.to_dict()} for c in plan.changes],
        "unchanged": [{"subject": c.subject, **c.to_dict()} for c in plan.unchanged],
        "conflicts": plan.conflicts,
    }

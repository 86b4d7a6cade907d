"""The plan: a pure, deterministic function of facts and policy. No I/O here.

Each change names its knob, the value found (the precondition), the target, its persistence and a
reason a person can check. Changes come in the order they must be applied: backing swap first,
zswap settings before zswap is switched on, then sysctls, then units.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from autoglm_helper.contract import catalogue
from autoglm_helper.contract.catalogue import CatalogueError, Value
from autoglm_helper.contract.plan_schema import PLAN_VERSION, Change

from . import rules
from .collect import mount_for
from .errors import BadInput
from .facts import DEVICE_CLASSES, Facts
from .policy import AUTO, KEEP, Policy


@dataclass(frozen=True)
class ProcessPlan:
    """How the inference process is to run."""

    cpus: list[int]
    threads: int
    sched_policy: str
    nice: int
    io_class: str
    io_priority: int
    oom_score_adj: int
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpus": self.cpus,
            "threads": self.threads,
            "sched_policy": self.sched_policy,
            "nice": self.nice,
            "io_class": self.io_class,
            "io_priority": self.io_priority,
            "oom_score_adj": self.oom_score_adj,
            "reasons": self.reasons,
        }


@dataclass(frozen=True)
class Plan:
    host: str | None
    policy_sources: list[str]
    changes: list[Change]  # knobs whose live value differs from the target
    unchanged: list[Change]  # managed knobs already at their target
    process: ProcessPlan
    notes: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "version": PLAN_VERSION,
            "host": self.host,
            "policy_sources": self.policy_sources,
            "changes": [c.to_dict() for c in self.changes],
            "unchanged": [c.to_dict() for c in self.unchanged],
            "process": self.process.to_dict(),
            "notes": self.notes,
            "conflicts": self.conflicts,
        }
        import hashlib  # here, not at the top: `diff` shows no plan id, and hashlib (OpenSSL) costs it ~3 ms

        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        return {"plan_id": digest[:16], **body}

    @property
    def in_sync(self) -> bool:
        return not self.changes


KEPT = "the policy says keep"


class _Builder:
    """Collects changes and notes while the plan is made."""

    def __init__(self, facts: Facts) -> None:
        self.facts = facts
        self.changes: list[Change] = []
        self.unchanged: list[Change] = []
        self.notes: list[str] = []
        self.conflicts: list[str] = []  # settings of the plan itself that measurements warn against

    def current(self, knob_name: str) -> Value | None:
        raw = self.facts.knobs.get(knob_name)
        if raw is None:
            return None
        try:
            return catalogue.SCALAR_KNOBS[knob_name].parse(raw)
        except CatalogueError as exc:
            self.notes.append(str(exc))
            return None

    def add(self, change: Change) -> None:
        (self.unchanged if change.current == change.target else self.changes).append(change)

    def scalar(self, knob_name: str, target: Value | None, reason: str) -> None:
        """Plan one catalogue knob, or say why it is left alone (target None)."""
        if target is None:
            if reason != KEPT:
                self.notes.append(f"{knob_name} left as is: {reason}")
            return
        if knob_name not in self.facts.knobs:
            self.notes.append(f"{knob_name} left as is: this kernel does not have it")
            return
        knob = catalogue.SCALAR_KNOBS[knob_name]
        knob.check(target)
        self.add(
            Change(
                knob=knob_name,
                current=self.current(knob_name),
                target=target,
                persistence=knob.persistence,
                reason=reason,
            )
        )


def _choose(policy_value: Any, auto: tuple[Any, str], what: str) -> tuple[Any, str]:
    """The policy's explicit value, or the auto rule's; "keep" leaves the knob alone."""
    if policy_value == KEEP:
        return None, KEPT
    if policy_value == AUTO:
        return auto
    return policy_value, f"set by the policy ({what} = {json.dumps(policy_value)})"


def _swap_file(b: _Builder, policy: Policy) -> tuple[str | None, Change | None]:
    """A swap file on the fastest device to back a zswap planned on where no disk swap exists (zswap stores
    nothing without one); (None, None), with a note saying why, when none can be made."""
    swap = policy["swap"]
    if swap["file"] != AUTO:
        return None, None
    candidates = []
    for order, directory in enumerate(swap["file_dirs"]):
        mount = mount_for(directory, b.facts.mounts)
        if mount is not None and mount.device_class not in ("zram", "unknown"):
            candidates.append((DEVICE_CLASSES.index(mount.device_class), order, directory, mount))
    if not candidates:
        b.notes.append("no swap file planned: none of [swap] file_dirs lies on a known disk")
        return None, None
    _, _, directory, mount = min(candidates)
    path = f"{directory}/{catalogue.SWAP_FILE_NAME}"
    if path in b.facts.swap_files:  # an earlier apply's, inactive since a reboot: swapped on again as it is
        size = b.facts.swap_files[path]
        basis = f"the file an earlier apply made ({size} MiB), swapped on again"
    else:
        size, basis = _choose(
            swap["file_size_mib"],
            rules.swap_file_size_mib(b.facts.memory.total_kib, mount.free_mib),
            "[swap] file_size_mib",
        )
    if size is None:
        b.notes.append(f"no swap file planned: {basis}")
        return None, None
    change = Change(
        knob="swap.file",
        current=None,
        target=size,
        persistence="persistent",
        reason=f"zswap is planned on and needs backing swap, and there is none; {size} MiB on the {mount.device_class} "
        f"holding {mount.mount_point}: {basis}",
        path=path,
        priority=swap["priorities"][mount.device_class],
    )
    return mount.device_class, change


def _swap_priorities(b: _Builder, policy: Policy) -> None:
    """Faster devices first; all disk swap below any active zram, which is RAM (equal priorities interleave)."""
    if not policy["swap"]["prioritize"]:
        return
    priorities = policy["swap"]["priorities"]
    zram = [a.priority for a in b.facts.swaps if a.device_class == "zram"]
    ceiling = min(zram) - 1 if zram else catalogue.SWAP_PRIORITY.maximum
    for area in b.facts.swaps:
        if area.device_class == "zram":
            continue
        target = max(0, min(priorities[area.device_class], ceiling or 0))
        reason = f"{area.device_class} swap: faster devices are used first ({_table(priorities)})"
        if target != priorities[area.device_class]:
            reason += f"; kept below the zram swap at priority {min(zram)}"
        b.add(
            Change(
                knob="swap.priority",
                current=area.priority,
                target=target,
                persistence="runtime",
                reason=reason,
                area=area.area,
            )
        )


def _table(priorities: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in priorities.items())


def _zswap(b: _Builder, policy: Policy, enable: bool | None, enable_reason: str, zram_active: bool) -> bool:
    """Plan the zswap parameters; returns whether zswap will be on afterwards."""
    z = policy["zswap"]
    params = set(b.facts.zswap.parameters)
    currently_on = b.current("zswap.enabled") is True
    if not b.facts.zswap.present:
        b.notes.append("zswap left alone: this kernel has no zswap")
        return False
    will_be_on = currently_on if enable is None else enable
    if will_be_on and not zram_active:  # in front of zram only the conflict is reported
        preference = rules.AUTO_COMPRESSORS if z["compressor"] == AUTO else z["compressor"]
        if preference == KEEP:
            b.scalar("zswap.compressor", None, KEPT)
        else:
            b.scalar("zswap.compressor", *rules.compressor(preference, b.facts.zswap.compressors_available))
        b.scalar(
            "zswap.max_pool_percent",
            *_choose(
                z["max_pool_percent"], rules.max_pool_percent(b.facts.memory.total_kib), "[zswap] max_pool_percent"
            ),
        )
        b.scalar(
            "zswap.accept_threshold_percent",
            *_choose(z["accept_threshold_percent"], (None, ""), "[zswap] accept_threshold_percent"),
        )
        b.scalar(
            "zswap.shrinker_enabled",
            *_choose(
                z["shrinker_enabled"], rules.shrinker_enabled("shrinker_enabled" in params), "[zswap] shrinker_enabled"
            ),
        )
    b.scalar("zswap.enabled", enable, enable_reason)
    return will_be_on


def _units(b: _Builder, policy: Policy) -> None:
    """Disable or mask the policy's redundant units; only where systemd runs, as only it can change them."""
    services = policy["services"]
    masked = set(services["mask"])
    wanted = sorted(set(services["disable"]) | masked)
    if wanted and not b.facts.systemd_running:
        b.notes.append(
            "services left alone: systemd is not PID 1 on this machine (no /run/systemd/system), so the helper "
            "cannot change units; [services] disable and mask take effect where systemd runs"
        )
        return
    if not b.facts.units:
        if wanted:
            b.notes.append("services left alone: no unit files found on this machine")
        return
    states = {u.name: u.state for u in b.facts.units}
    for name in wanted:
        state = states.get(name)
        if state is None:
            continue
        rule = catalogue.never_touch_rule(name, services["never_touch"])
        if rule is not None:
            b.notes.append(f"{name} left alone: it is on the never-touch list ({rule})")
            continue
        target = "masked" if name in masked else "disabled"
        if target == "disabled" and state in ("static", "indirect", "generated", "transient", "alias"):
            b.notes.append(f"{name} is {state}: it cannot be disabled; list it under [services] mask to stop it")
            continue
        if target == "disabled" and state == "masked":
            target = state  # already stronger than asked for: it stays masked
        b.add(
            Change(
                knob="unit",
                current=state,
                target=target,
                persistence="persistent",
                reason=f"{name} is redundant on a model server ([services] {'mask' if name in masked else 'disable'})",
                unit=name,
            )
        )


def _calibrated(facts: Facts, policy: Policy) -> tuple[dict[str, Any] | None, str | None]:
    """The calibration when "auto" CPU set and threads may use it and it still describes this machine and model;
    else None and the line saying why it is not used (None without a calibration). One recorded in the facts (from
    `facts --json` on the host measured) wins over the policy's, which describes the machine planning."""
    recorded, cal = facts.calibration, policy.calibration
    if recorded is not None:
        source = f"{recorded.source} (in the facts of {recorded.host})"
    elif cal is not None:
        source = cal.source
    else:
        return None, None
    explicit = [k for k in ("cpus", "threads", "reserve_cores") if policy["process"][k] != AUTO]
    if explicit:
        return None, f"calibration {source} not used: [process] {', '.join(explicit)} set by the policy"
    from .calibrate_core import stale_because  # only where there is a calibration: its statistics import is slow
    from .policy import ModelStamp

    model_path = policy["model"]["model_path"]
    if recorded is not None:  # the model file was checked where the facts were collected
        values = dataclasses.asdict(recorded)
        found = ModelStamp(recorded.model_path, recorded.model_bytes, recorded.model_mtime_ns)
        why = recorded.stale_because or stale_because(values, found, facts.cpu, model_path)
    elif cal is not None:
        values = cal.values
        why = stale_because(values, cal.found, facts.cpu, model_path)
    if why is not None:
        return None, (f"calibration {source} is stale: {why}; the CPU set and threads below come from the "
                      "rules instead; rerun autoglm-tune calibrate")
    return values, f"CPU set and threads from {source}: {values['reason']}"


def _process(facts: Facts, policy: Policy) -> ProcessPlan:
    p = policy["process"]
    online = facts.cpu.online
    reasons = []
    calibration, line = _calibrated(facts, policy)
    if line is not None:
        reasons.append(line)
    if calibration is not None:
        cpus = list(calibration["cpus"])
    elif p["cpus"] != AUTO:
        outside = sorted(set(p["cpus"]) - set(online))
        if outside:
            raise BadInput(
                f"[process] cpus = {list(p['cpus'])}: CPUs {outside} are not online here; allowed: a subset of {online}"
            )
        cpus = list(p["cpus"])
        reasons.append("CPU set from the policy")
    else:
        pool = [c for c in facts.cpu.cpus if c.id in online]
        performance = [c for c in pool if c.kind == "performance"]
        efficiency = [c for c in pool if c.kind == "efficiency"]
        if performance and efficiency:
            pool = performance
            reasons.append(
                f"performance cores only: efficiency CPUs {[c.id for c in efficiency]} slow every "
                "step of a lockstep ggml graph (research §4.1)"
            )
        cores: dict[str, int] = {}
        for c in sorted(pool, key=lambda c: c.id):
            cores.setdefault(c.core, c.id)
        firsts = sorted(cores.values())
        if len(firsts) < len(pool):
            reasons.append(
                f"one CPU per physical core ({len(firsts)} of {len(pool)}): SMT siblings share the "
                "memory bandwidth generation is bound by (research §4.1)"
            )
        reserve, basis = _choose(
            p["reserve_cores"], rules.reserve_cores(len(firsts), len(efficiency)), "[process] reserve_cores"
        )
        reserve = max(0, min(reserve or 0, len(firsts) - 1))  # 0 when no CPU is known at all
        if reserve:
            reasons.append(f"{reserve} core(s) left to the system, starting with CPU {firsts[0]}: {basis}")
        cpus = firsts[reserve:]
    nodes = [n for n, members in sorted(facts.cpu.numa_nodes.items()) if set(members) & set(cpus)]
    if len(nodes) > 1:
        reasons.append(f"the CPU set spans NUMA nodes {', '.join(nodes)}: weights are read across sockets")
    auto_threads = (len(cpus), "one thread per CPU in the set")
    if calibration is not None:
        auto_threads = (calibration["threads"], "as calibrated")
    elif not cpus:
        auto_threads = (1, "CPU topology unknown: one thread and no pinning")
    threads, basis = _choose(p["threads"], auto_threads, "[process] threads")
    if online and threads > len(online):  # more threads than CPUs only contend with each other in every step
        raise BadInput(
            f"[process] threads = {threads}: more than the {len(online)} online CPUs here; "
            f'allowed: an integer 1–{len(online)} or "auto"'
        )
    reasons.append(f"threads {threads}: {basis}")
    auto_nice, measured = rules.model_nice(), None
    if calibration is not None and calibration.get("nice") is not None:
        measured = calibration["nice"]
        auto_nice = (measured, calibration["nice_reason"])
    nice, basis = _choose(p["nice"], auto_nice, "[process] nice")
    if measured is not None and p["nice"] != AUTO:
        basis += f"; the calibrated nice {measured} is not used"
    reasons.append(f"nice {nice}: {basis}")
    return ProcessPlan(
        cpus=cpus,
        threads=threads,
        sched_policy=p["sched_policy"],
        nice=nice,
        io_class=p["io_class"],
        io_priority=p["io_priority"],
        oom_score_adj=p["oom_score_adj"],
        reasons=reasons,
    )


def _conflicts(facts: Facts) -> list[str]:
    conflicts = []
    for tuner in facts.tuners:
        state = {True: "enabled", False: "not enabled", None: "state unknown"}[tuner.enabled]
        conflicts.append(
            f"{tuner.name} is installed ({tuner.evidence}, {state}): it also manages {'; '.join(tuner.conflicts_on)}"
        )
    if any(a.device_class == "zram" for a in facts.swaps):
        conflicts.append("zram swap is active: zswap is not planned in front of it; turn zram off to use zswap")
    return conflicts


def _kernel(b: _Builder, facts: Facts, policy: Policy) -> None:
    """Swap, zswap and vm sysctls: kernel-wide, so only planned outside containers."""
    z, vm = policy["zswap"], policy["vm"]
    zram_active = any(a.device_class == "zram" for a in facts.swaps)
    disk_swaps = [a for a in facts.swaps if a.device_class != "zram"]

    # 1. is zswap to be on? Only then does it need a swap file to stand on where there is no disk swap.
    explicit = f"set by the policy ([zswap] enabled = {json.dumps(z['enabled'])})"
    if z["enabled"] == KEEP:
        wants_zswap, enable_reason = None, KEPT
    elif z["enabled"] is False:
        wants_zswap, enable_reason = False, explicit
    elif zram_active and z["enabled"] is True:
        wants_zswap = None
        enable_reason = "the policy asks for zswap, but in front of the active zram swap it compresses every page twice"
    elif z["enabled"] == AUTO:  # the model is protected where systemd gives it MemoryLow=
        protected = facts.systemd_running and facts.cgroup.memory_controller == "v2"
        wants_zswap, enable_reason = rules.zswap_enabled(zram_active, protected)
    else:
        wants_zswap, enable_reason = True, explicit
    file_class, file_change = None, None
    if wants_zswap is True and facts.zswap.present and not disk_swaps:
        file_class, file_change = _swap_file(b, policy)
    classes = [a.device_class for a in disk_swaps] + ([file_class] if file_class else [])
    backing_class = min(classes, key=DEVICE_CLASSES.index) if classes else None
    if file_change is not None:
        b.add(file_change)

    # 2. swap priorities, zswap, then the sysctls that depend on them
    _swap_priorities(b, policy)
    zswap_on = _zswap(b, policy, wants_zswap, enable_reason, zram_active)
    situation = rules.SwapSituation(zram_active=zram_active, backing_class=backing_class, zswap_on=zswap_on)
    b.scalar("vm.swappiness", *_choose(vm["swappiness"], rules.swappiness(situation), "[vm] swappiness"))
    planned = [c.target for c in b.changes + b.unchanged if c.knob == "vm.swappiness"]
    swappiness = planned[0] if planned else b.current("vm.swappiness")  # kept: the value found stays
    risk = rules.low_swappiness_risk(swappiness if isinstance(swappiness, int) else None, zswap_on)
    if risk:
        b.conflicts.append(risk)
    b.scalar(
        "vm.vfs_cache_pressure",
        *_choose(vm["vfs_cache_pressure"], rules.vfs_cache_pressure(), "[vm] vfs_cache_pressure"),
    )
    b.scalar("vm.page-cluster", *_choose(vm["page-cluster"], rules.page_cluster(situation), "[vm] page-cluster"))
    for key in ("watermark_scale_factor", "watermark_boost_factor", "compaction_proactiveness"):
        if vm[key] != KEEP:
            b.scalar(f"vm.{key}", vm[key], f"set by the policy ([vm] {key} = {vm[key]})")
    accounting = policy["process"]["delay_accounting"]
    if accounting != KEEP:
        b.scalar(
            "kernel.task_delayacct",
            int(accounting),
            f"set by the policy ([process] delay_accounting = {json.dumps(accounting)}): "
            "`status` shows the model's swap-in and block-I/O delays only while it is on",
        )
    if facts.cgroup.memory_controller == "v1" and any(c.knob == "vm.swappiness" for c in b.changes):
        b.notes.append(
            "cgroup v1 memory controller: each existing memory cgroup keeps its own copy of "
            "vm.swappiness (memory.swappiness); the new value reaches only cgroups created afterwards"
        )


def make_plan(facts: Facts, policy: Policy) -> Plan:
    """The plan for `facts` under `policy`. Pure: same input, byte-identical output."""
    b = _Builder(facts)
    if facts.container:
        b.notes.append(
            f"running inside a {facts.container} container: zswap, swap areas and vm sysctls belong to the host "
            "kernel; plan them on the host"
        )
    else:
        _kernel(b, facts, policy)

    _units(b, policy)

    return Plan(
        host=facts.hostname,
        policy_sources=list(policy.sources),
        changes=b.changes,
        unchanged=b.unchanged,
        process=_process(facts, policy),
        notes=b.notes,
        conflicts=_conflicts(facts) + b.conflicts,
    )

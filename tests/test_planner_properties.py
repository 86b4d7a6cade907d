"""Property tests of the planner's invariants over generated facts and generated valid policies.

Facts are built as dataclasses directly, shaped like the collector's output (CPUs listed for the
online ones, `core` the sibling list, kinds from hybrid PMU folders or capacities) but with odd
numberings, odd kernel knob texts, any mix of swap devices and mounts. Policies are generated as
TOML-like documents and validated by the real schema, so only valid policies reach the planner.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import posixpath
import tomllib
from typing import Any

import pytest
from autoglm_helper.contract import catalogue
from autoglm_helper.contract.plan_schema import changes_from_plan, plan_from_json
from autoglm_tune import rules
from autoglm_tune.collect import mount_for, parse_cpulist
from autoglm_tune.errors import BadInput
from autoglm_tune.facts import (
    DEVICE_CLASSES,
    FACTS_VERSION,
    CgroupFacts,
    Cpu,
    CpuFacts,
    Facts,
    MemoryFacts,
    Mount,
    SwapArea,
    TunerFacts,
    UnitFacts,
    ZswapFacts,
    facts_from_json,
)
from autoglm_tune.planner import Plan, make_plan
from autoglm_tune.policy import AUTO, Policy, default_policy_text, validate_document
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

GIB_KIB = 1024 * 1024
SPEED = {cls: i for i, cls in enumerate(DEVICE_CLASSES)}  # lower = faster

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- facts -----------------------------------------------------------------------------------


@st.composite
def cpu_facts(draw: st.DrawFn) -> CpuFacts:
    """A CPU topology: plain, SMT (adjacent or cpuN/cpuN+k siblings), Intel hybrid (P-cores with or
    without HT beside E-cores), or ARM capacities in 2–3 tiers; numbered in any order; some offline."""
    shape = draw(st.sampled_from(["plain", "smt-adjacent", "smt-offset", "hybrid", "capacity"]))
    cores: list[list[int]] = []
    kind: dict[int, str] = {}
    capacity: dict[int, int] = {}
    hybrid = False
    if shape == "plain":
        n = draw(st.integers(1, 16))
        cores = [[i] for i in range(n)]
    elif shape == "smt-adjacent":
        n = draw(st.integers(1, 8))
        cores = [[2 * i, 2 * i + 1] for i in range(n)]
    elif shape == "smt-offset":
        n = draw(st.integers(1, 8))
        cores = [[i, i + n] for i in range(n)]
    elif shape == "hybrid":
        p, e, ht = draw(st.integers(1, 8)), draw(st.integers(1, 16)), draw(st.booleans())
        cores = [[2 * i, 2 * i + 1] if ht else [i] for i in range(p)]
        first_e = 2 * p if ht else p
        cores += [[first_e + i] for i in range(e)]
        kind = {c: "performance" for core in cores[:p] for c in core} | {
            c: "efficiency" for core in cores[p:] for c in core
        }
        hybrid = True
    else:
        tiers = draw(st.lists(st.integers(1, 4), min_size=2, max_size=3))
        smaller = st.lists(st.integers(100, 1023), min_size=len(tiers) - 1, max_size=len(tiers) - 1, unique=True)
        caps = [*sorted(draw(smaller)), 1024]
        n = 0
        for count, cap in zip(tiers, caps, strict=True):
            for _ in range(count):
                cores.append([n])
                capacity[n] = cap
                kind[n] = "performance" if cap * 2 >= 1024 else "efficiency"
                n += 1
    total = sum(len(c) for c in cores)
    if draw(st.booleans()):  # renumber: firmware and kernels number CPUs in many ways
        perm = draw(st.permutations(list(range(total))))
        cores = [[perm[c] for c in core] for core in cores]
        kind = {perm[c]: k for c, k in kind.items()}
        capacity = {perm[c]: v for c, v in capacity.items()}
    all_ids = sorted(c for core in cores for c in core)
    offline = set(draw(st.lists(st.sampled_from(all_ids), max_size=max(0, total - 1), unique=True)))
    online = [c for c in all_ids if c not in offline]
    two_sockets = draw(st.booleans()) and len(cores) > 1
    package = {c: (idx * 2 // len(cores) if two_sockets else 0) for idx, core in enumerate(cores) for c in core}
    cpus = [
        Cpu(
            id=c,
            core=",".join(map(str, sorted(next(core for core in cores if c in core)))),
            package=package[c],
            kind=kind.get(c, "standard"),
            capacity=capacity.get(c),
        )
        for c in online
    ]
    nodes = {f"node{p}": sorted(c for c in online if package[c] == p) for p in sorted(set(package.values()))}
    return CpuFacts(
        online=online,
        cpus=cpus,
        hybrid=hybrid,
        model=draw(st.none() | st.just("Some CPU")),
        numa_nodes=nodes,
        isolated=[],
    )


@st.composite
def memory_facts(draw: st.DrawFn) -> MemoryFacts:
    total = draw(st.none() | st.integers(256 * 1024, 512 * GIB_KIB))
    available = None if total is None else draw(st.none() | st.integers(0, total))
    return MemoryFacts(
        total_kib=total,
        available_kib=available,
        zswap_kib=draw(st.none() | st.integers(0, 10**7)),
        zswapped_kib=None,
        psi_some=None,
        psi_full=None,
    )


DEVICE_NAMES = {"zram": "zram0", "nvme": "nvme0n1", "ssd": "sda", "mmc": "mmcblk0", "hdd": "sdb", "unknown": None}


@st.composite
def swap_areas(draw: st.DrawFn) -> list[SwapArea]:
    classes = draw(st.lists(st.sampled_from(DEVICE_CLASSES), max_size=5))
    areas = []
    for i, cls in enumerate(classes):
        kind = "partition" if cls == "zram" else draw(st.sampled_from(["partition", "file"]))
        if kind == "partition":
            area = f"/dev/{DEVICE_NAMES[cls] or 'sdz'}{i}"
        else:
            area = draw(st.sampled_from([f"/swapfile{i}", f"/var/swap/file{i}", f"/home/my\\040swap{i}"]))
        size = draw(st.integers(0, 64 * GIB_KIB))
        areas.append(
            SwapArea(
                area=area,
                type=kind,
                size_kib=size,
                used_kib=draw(st.integers(0, size)),
                priority=draw(st.integers(-10, 32767)),
                device=DEVICE_NAMES[cls],
                device_class=cls,
            )
        )
    return areas


MOUNT_POINTS = [
    "/",
    "/var",
    "/var/lib",
    "/var/lib/autoglm-tune",
    "/var/lib/autoglm-tune/swap",
    "/var/swap",
    "/swap",
    "/home",
]


@st.composite
def mounts(draw: st.DrawFn) -> list[Mount]:
    points = draw(st.lists(st.sampled_from(MOUNT_POINTS), unique=True, max_size=5))
    return [
        Mount(
            mount_point=mp,
            fstype=draw(st.sampled_from(["ext4", "btrfs", "xfs"])),
            source=f"/dev/x{i}",
            device=None,
            device_class=draw(st.sampled_from(DEVICE_CLASSES)),
            free_mib=draw(st.none() | st.integers(0, 4_000_000)),
        )
        for i, mp in enumerate(points)
    ]


ZSWAP_OPTIONAL = [
    "accept_threshold_percent",
    "shrinker_enabled",
    "zpool",
    "same_filled_pages_enabled",
    "non_same_filled_pages_enabled",
    "exclusive_loads",
]
COMPRESSORS = ["lz4", "zstd", "lzo", "lzo-rle", "842", "deflate", "lz4hc"]


def raw_knob_text(knob: catalogue.Knob) -> st.SearchStrategy[str]:
    """What a kernel file may hold: in range, odd but accepted by the kernel, or unreadable."""
    if knob.kind == "bool":
        return st.sampled_from(["Y", "N", "1", "0", "y", "maybe", ""])
    if knob.kind == "word":
        return st.sampled_from([*COMPRESSORS, "LZO", "", "[lz4]"])
    assert knob.minimum is not None and knob.maximum is not None
    return st.one_of(
        st.integers(knob.minimum, knob.maximum).map(str),
        st.sampled_from(["0", "101", "201", "536870912", "-1", "4294967295", "", "abc", "1.5"]),
    )


UNIT_POOL = [
    "cups.service",
    "cups.socket",
    "bluetooth.service",
    "ModemManager.service",
    "apt-daily.timer",
    "ssh.service",
    "systemd-resolved.service",
    "fwupd-refresh.timer",
    "tlp.service",
    "NetworkManager.service",
    "whoopsie.service",
    "autoglm-tune.service",
]
UNIT_STATES = [
    "enabled",
    "enabled-runtime",
    "disabled",
    "static",
    "masked",
    "masked-runtime",
    "indirect",
    "generated",
    "alias",
    "linked",
]


@st.composite
def facts_strategy(draw: st.DrawFn) -> Facts:
    present = draw(st.booleans())
    optional = draw(st.lists(st.sampled_from(ZSWAP_OPTIONAL), unique=True))
    params = ["enabled", "compressor", "max_pool_percent", *optional] if present else []
    knobs = {}
    for name, knob in catalogue.SCALAR_KNOBS.items():
        if name.startswith("zswap."):
            if name.removeprefix("zswap.") in params:
                knobs[name] = draw(raw_knob_text(knob))
        elif draw(st.integers(0, 9)) > 0:  # now and then a kernel lacks a vm sysctl
            knobs[name] = draw(raw_knob_text(knob))
    units = [
        UnitFacts(name=n, state=draw(st.sampled_from(UNIT_STATES)), active=None, source="files")
        for n in sorted(draw(st.lists(st.sampled_from(UNIT_POOL), unique=True, max_size=8)))
    ]
    tuners = [
        TunerFacts(name=n, evidence=f"/usr/sbin/{n}", enabled=draw(st.none() | st.booleans()), conflicts_on=["x"])
        for n in draw(st.lists(st.sampled_from(["tuned", "tlp", "zram-generator"]), unique=True, max_size=2))
    ]
    return Facts(
        version=FACTS_VERSION,
        hostname=draw(st.none() | st.sampled_from(["box", "laptop-7"])),
        kernel=draw(st.none() | st.sampled_from(["5.10.0", "6.1.0", "6.18.44"])),
        cpu=draw(cpu_facts()),
        memory=draw(memory_facts()),
        swaps=draw(swap_areas()),
        mounts=draw(mounts()),
        zswap=ZswapFacts(
            present=present,
            parameters=sorted(params),
            compressors_available=sorted(draw(st.lists(st.sampled_from(COMPRESSORS), unique=True))),
        ),
        knobs=knobs,
        thp=draw(st.sampled_from([{}, {"enabled": "madvise", "defrag": "madvise"}])),
        cgroup=CgroupFacts(
            layout=draw(st.sampled_from(["v1", "v2", "hybrid", "unknown"])),
            memory_controller=draw(st.sampled_from([None, "v1", "v2"])),
        ),
        systemd_running=draw(st.booleans()),
        container=draw(st.sampled_from([None, None, None, "lxc"])),
        units=units,
        tuners=tuners,
        notes=[],
    )


# ---- policies --------------------------------------------------------------------------------


def value_or(words: list[str], values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.sampled_from(words), values)


@st.composite
def policy_doc(draw: st.DrawFn, online: list[int]) -> dict[str, dict[str, Any]]:
    """A policy document (as TOML would parse it) with a random subset of keys set to valid values."""
    full: dict[str, dict[str, Any]] = {
        "vm": {
            "swappiness": value_or(["auto", "keep"], st.integers(0, 200)),
            "vfs_cache_pressure": value_or(["auto", "keep"], st.integers(1, 1000)),
            "page-cluster": value_or(["auto", "keep"], st.integers(0, 10)),
            "watermark_scale_factor": value_or(["keep"], st.integers(1, 3000)),
            "watermark_boost_factor": value_or(["keep"], st.integers(0, 100000)),
            "compaction_proactiveness": value_or(["keep"], st.integers(0, 100)),
        },
        "zswap": {
            "enabled": value_or(["auto", "keep"], st.booleans()),
            "compressor": st.one_of(
                st.sampled_from(["auto", "keep"]),
                st.sampled_from(COMPRESSORS),
                st.lists(st.sampled_from(COMPRESSORS), min_size=1, max_size=4, unique=True),
            ),
            "max_pool_percent": value_or(["auto", "keep"], st.integers(1, 100)),
            "accept_threshold_percent": value_or(["keep"], st.integers(1, 100)),
            "shrinker_enabled": value_or(["auto", "keep"], st.booleans()),
        },
        "swap": {
            "prioritize": st.booleans(),
            "priorities": st.lists(st.integers(0, 32767), min_size=5, max_size=5).map(
                lambda v: dict(zip(["nvme", "ssd", "mmc", "hdd", "unknown"], sorted(v, reverse=True), strict=True))
            ),
            "file": st.sampled_from(["auto", "off"]),
            "file_dirs": st.lists(st.sampled_from(catalogue.SWAP_FILE_DIRS), min_size=1, unique=True),
            "file_size_mib": value_or(["auto"], st.integers(64, 262144)),
        },
        "services": {
            "disable": st.lists(st.sampled_from(UNIT_POOL), unique=True, max_size=6),
            "mask": st.lists(st.sampled_from(UNIT_POOL), unique=True, max_size=3),
            "never_touch": st.lists(st.sampled_from(["cups*", "tlp.service", "bluetooth.*"]), unique=True, max_size=2),
        },
        "process": {
            "cpus": value_or(["auto"], st.lists(st.sampled_from(online), min_size=1, unique=True)),
            "reserve_cores": value_or(["auto"], st.integers(0, 64)),
            "threads": value_or(["auto"], st.integers(1, max(1, len(online)))),
            "sched_policy": st.sampled_from(catalogue.SCHED_POLICIES),
            "nice": st.integers(*catalogue.MODEL_NICE_RANGE),
            "io_class": st.sampled_from(catalogue.IO_CLASSES),
            "io_priority": st.integers(*catalogue.IO_PRIORITY_RANGE),
            "oom_score_adj": st.integers(*catalogue.MODEL_OOM_SCORE_ADJ_RANGE),
        },
    }
    doc: dict[str, dict[str, Any]] = {}
    for section, keys in full.items():
        for key, strategy in keys.items():
            if draw(st.booleans()):
                doc.setdefault(section, {})[key] = draw(strategy)
    return doc


def make_policy(doc: dict[str, dict[str, Any]]) -> Policy:
    """The default policy overridden by `doc`, the way load_policy merges a file (but without files)."""
    merged = validate_document(tomllib.loads(default_policy_text()), "built-in default policy")
    for section, values in validate_document(doc, "generated.toml").items():
        merged[section].update(values)
    return Policy(values=merged, sources=("built-in default", "generated.toml"))


@st.composite
def cases(draw: st.DrawFn) -> tuple[Facts, Policy]:
    facts = draw(facts_strategy())
    return facts, make_policy(draw(policy_doc(facts.cpu.online)))


@st.composite
def auto_cpu_cases(draw: st.DrawFn) -> tuple[Facts, Policy]:
    """Cases where the planner picks the CPU set and the threads itself."""
    facts = draw(facts_strategy())
    doc = draw(policy_doc(facts.cpu.online))
    doc.setdefault("process", {}).update(cpus="auto", threads="auto")
    return facts, make_policy(doc)


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), sort_keys=True)


# ---- the CPU set -----------------------------------------------------------------------------


@PROPS
@given(auto_cpu_cases())
def test_no_two_cpus_of_one_core(case: tuple[Facts, Policy]) -> None:
    facts, policy = case
    cpus = make_plan(facts, policy).process.cpus
    core_of = {c.id: c.core for c in facts.cpu.cpus}
    assert len({core_of[c] for c in cpus}) == len(cpus)
    for c in cpus:  # the core string names siblings, the CPU itself among them
        assert c in parse_cpulist(core_of[c])


@PROPS
@given(auto_cpu_cases())
def test_only_performance_cpus_on_hybrid(case: tuple[Facts, Policy]) -> None:
    facts, policy = case
    cpus = make_plan(facts, policy).process.cpus
    kinds = {c.kind for c in facts.cpu.cpus}
    kind_of = {c.id: c.kind for c in facts.cpu.cpus}
    if {"performance", "efficiency"} <= kinds:
        assert {kind_of[c] for c in cpus} == {"performance"}
        # …and every performance core is used unless the policy reserves some
        p_cores = {c.core for c in facts.cpu.cpus if c.kind == "performance"}
        if policy["process"]["reserve_cores"] in (0, AUTO):
            assert len(cpus) == len(p_cores)


@PROPS
@given(cases())
def test_cpu_set_is_a_nonempty_sorted_subset_of_online(case: tuple[Facts, Policy]) -> None:
    facts, policy = case
    process = make_plan(facts, policy).process
    assert process.cpus, "empty CPU set"
    assert process.cpus == sorted(set(process.cpus))
    assert set(process.cpus) <= set(facts.cpu.online)
    if policy["process"]["cpus"] != AUTO:
        assert process.cpus == list(policy["process"]["cpus"])
    assert catalogue.MODEL_NICE_RANGE[0] <= process.nice <= catalogue.MODEL_NICE_RANGE[1]
    assert catalogue.MODEL_OOM_SCORE_ADJ_RANGE[0] <= process.oom_score_adj <= catalogue.MODEL_OOM_SCORE_ADJ_RANGE[1]
    assert 1 <= process.threads <= max(1, len(facts.cpu.online))
    assert process.sched_policy in catalogue.SCHED_POLICIES and process.io_class in catalogue.IO_CLASSES


@PROPS
@given(cases())
def test_threads_match_the_cpu_set(case: tuple[Facts, Policy]) -> None:
    facts, policy = case
    process = make_plan(facts, policy).process
    if policy["process"]["threads"] == AUTO:
        assert process.threads == len(process.cpus)
    else:
        assert process.threads == policy["process"]["threads"]


@PROPS
@given(facts_strategy(), st.integers(1, 1024))
def test_threads_beyond_the_online_cpus_are_refused(facts: Facts, threads: int) -> None:
    """Only the facts know the CPU count: the plan refuses what the policy alone could not."""
    policy = make_policy({"process": {"threads": threads}})
    if threads <= len(facts.cpu.online):
        assert make_plan(facts, policy).process.threads == threads
        return
    allowed = f"allowed: an integer 1–{len(facts.cpu.online)}"
    with pytest.raises(BadInput, match=rf"^\[process\] threads = {threads}: .*{allowed}"):
        make_plan(facts, policy)


# ---- swap --------------------------------------------------------------------------------------


@PROPS
@given(cases())
def test_swap_priorities_are_ordered_by_device_speed(case: tuple[Facts, Policy]) -> None:
    """A faster class never gets a lower priority than a slower one; one class, one priority."""
    facts, policy = case
    plan = make_plan(facts, policy)
    cls_of = {a.area: a.device_class for a in facts.swaps}
    targets: list[tuple[str, int]] = []
    for c in plan.changes + plan.unchanged:
        if c.knob == "swap.priority":
            assert c.area is not None
            targets.append((cls_of[c.area], int(c.target)))
        elif c.knob == "swap.file":
            assert c.priority is not None and c.path is not None
            mount = mount_for(posixpath.dirname(c.path), facts.mounts)
            assert mount is not None
            targets.append((mount.device_class, c.priority))
    for cls_a, prio_a in targets:
        assert cls_a != "zram", "a zram area got a priority change"
        for cls_b, prio_b in targets:
            if SPEED[cls_a] < SPEED[cls_b]:
                assert prio_a >= prio_b, (cls_a, prio_a, cls_b, prio_b)
            if cls_a == cls_b:
                assert prio_a == prio_b
    prioritized = {c.area for c in plan.changes + plan.unchanged if c.knob == "swap.priority"}
    if policy["swap"]["prioritize"] and not facts.container:
        assert prioritized == {a.area for a in facts.swaps if a.device_class != "zram"}
    else:
        assert prioritized == set()


@PROPS
@given(cases())
def test_kernel_wide_knobs_are_left_to_the_host_inside_a_container(case: tuple[Facts, Policy]) -> None:
    facts, policy = case
    plan = make_plan(facts, policy)
    kernel = [c for c in plan.changes + plan.unchanged if c.knob != "unit"]
    if facts.container:
        assert kernel == []
        assert any("container" in n for n in plan.notes)


@PROPS
@given(cases())
def test_zswap_is_never_enabled_in_front_of_zram(case: tuple[Facts, Policy]) -> None:
    facts, policy = case
    plan = make_plan(facts, policy)
    if any(a.device_class == "zram" for a in facts.swaps):
        assert not any(c.knob == "zswap.enabled" and c.target is True for c in plan.changes + plan.unchanged)
        assert not any(c.knob == "swap.file" for c in plan.changes)
        assert any("zram" in text for text in plan.conflicts)


@PROPS
@given(cases())
def test_auto_zswap_is_never_turned_on_and_says_what_measured_it(case: tuple[Facts, Policy]) -> None:
    """auto turns zswap on nowhere: no measurement showed it a gain (docs/BENCHMARKS.md parts 2 and 5)."""
    facts, policy = case
    if policy["zswap"]["enabled"] != AUTO or facts.container:
        return
    plan = make_plan(facts, policy)
    assert not any(c.knob == "zswap.enabled" and c.target is True for c in plan.changes + plan.unchanged)
    assert not any(c.knob == "swap.file" for c in plan.changes)  # a file is planned only to back a zswap
    for c in plan.changes + plan.unchanged:
        if c.knob == "zswap.enabled" and not any(a.device_class == "zram" for a in facts.swaps):
            assert "docs/bench/" in c.reason or "docs/BENCHMARKS.md" in c.reason, c.reason


@PROPS
@given(cases())
def test_swap_file_only_when_there_is_no_swap(case: tuple[Facts, Policy]) -> None:
    facts, policy = case
    files = [c for c in make_plan(facts, policy).changes if c.knob == "swap.file"]
    if facts.swaps or policy["swap"]["file"] != AUTO:
        assert files == []
    assert len(files) <= 1
    for c in files:  # on the fastest known disk among the policy's directories
        assert c.path is not None
        chosen = mount_for(posixpath.dirname(c.path), facts.mounts)
        candidates = [mount_for(d, facts.mounts) for d in policy["swap"]["file_dirs"]]
        speeds = [SPEED[m.device_class] for m in candidates if m and m.device_class not in ("zram", "unknown")]
        assert chosen is not None and SPEED[chosen.device_class] == min(speeds)
        assert c.priority == policy["swap"]["priorities"][chosen.device_class]


def zswap_on_after(plan: Plan, facts: Facts) -> bool:
    """Whether zswap is on once the plan is applied: its planned target, else the value found."""
    planned = [c.target for c in plan.changes + plan.unchanged if c.knob == "zswap.enabled"]
    if planned:
        return planned[0] is True
    return facts.zswap.present and facts.knobs.get("zswap.enabled", "").strip() in ("Y", "1")


@PROPS
@given(cases())
def test_no_swap_file_for_zswap_while_zswap_stays_off(case: tuple[Facts, Policy]) -> None:
    """zswap is decided first: a swap file planned to back it comes only with zswap on (it once came with it off)."""
    facts, policy = case
    plan = make_plan(facts, policy)
    for c in plan.changes:
        if c.knob == "swap.file" and "zswap" in c.reason.split(";")[0]:
            assert zswap_on_after(plan, facts), (c.reason, [n for n in plan.notes if "zswap" in n])


@st.composite
def zswap_asked_cases(draw: st.DrawFn) -> tuple[Facts, Policy]:
    """Cases where the policy asks for zswap on a kernel that has it (rare among all cases), any swappiness."""
    facts = draw(facts_strategy().filter(lambda f: f.zswap.present and not f.container))
    doc = draw(policy_doc(facts.cpu.online))
    doc.setdefault("zswap", {})["enabled"] = draw(st.sampled_from([True, AUTO]))
    return facts, make_policy(doc)


@PROPS
@given(st.one_of(cases(), zswap_asked_cases()))
def test_low_swappiness_with_zswap_on_is_always_a_conflict(case: tuple[Facts, Policy]) -> None:
    """Whatever sets it (policy, auto or keep), swappiness at or below the measured OOM threshold with zswap on is
    reported, and only then."""
    facts, policy = case
    plan = make_plan(facts, policy)
    planned = [c.target for c in plan.changes + plan.unchanged if c.knob == "vm.swappiness"]
    raw = facts.knobs.get("vm.swappiness", "").strip()
    swappiness = planned[0] if planned else (int(raw) if raw.lstrip("-").isdigit() else None)
    expected = (not facts.container and zswap_on_after(plan, facts) and swappiness is not None
                and swappiness <= rules.LOW_SWAPPINESS_WITH_ZSWAP)
    warned = [c for c in plan.conflicts if c.startswith("vm.swappiness")]
    assert len(warned) == expected, (swappiness, warned)


# ---- every change ------------------------------------------------------------------------------


def check_target(change: Any) -> None:
    if change.knob in catalogue.SCALAR_KNOBS:
        assert catalogue.SCALAR_KNOBS[change.knob].check(change.target) == change.target
        assert type(change.target) is type(catalogue.SCALAR_KNOBS[change.knob].check(change.target))
    elif change.knob == "swap.priority":
        catalogue.SWAP_PRIORITY.check(change.target)
    elif change.knob == "swap.file":
        catalogue.SWAP_FILE_SIZE.check(change.target)
        catalogue.check_swap_file_path(change.path)
        catalogue.SWAP_PRIORITY.check(change.priority)
    else:
        assert change.knob == "unit" and change.target in catalogue.UNIT_TARGET_STATES
        catalogue.check_unit_name(change.unit)


@PROPS
@given(cases())
def test_every_target_passes_the_catalogue_and_the_plan_schema(case: tuple[Facts, Policy]) -> None:
    facts, policy = case
    plan = make_plan(facts, policy)
    for change in plan.changes + plan.unchanged:
        check_target(change)
        if change.knob.startswith("zswap."):
            assert change.knob.removeprefix("zswap.") in facts.zswap.parameters
        if change.knob == "zswap.compressor":
            assert change.target in facts.zswap.compressors_available
    data = plan.to_dict()
    assert changes_from_plan(data) == plan.changes
    assert plan_from_json(json.dumps(data)) == plan.changes  # also within the helper's size limit


@PROPS
@given(cases())
def test_no_change_is_a_no_op(case: tuple[Facts, Policy]) -> None:
    plan = make_plan(*case)
    assert all(c.current != c.target for c in plan.changes)
    assert all(c.current == c.target for c in plan.unchanged)
    assert plan.in_sync == (not plan.changes)


@PROPS
@given(cases())
def test_changes_come_in_apply_order(case: tuple[Facts, Policy]) -> None:
    """Backing swap first, zswap settings before zswap is switched on, then sysctls, then units."""
    plan = make_plan(*case)
    stage = {"swap": 0, "zswap": 1, "vm": 3, "unit": 4}
    order = [stage[c.knob.split(".")[0]] + (1 if c.knob == "zswap.enabled" else 0) for c in plan.changes]
    assert order == sorted(order)


@PROPS
@given(cases())
def test_never_touch_units_are_never_changed(case: tuple[Facts, Policy]) -> None:
    facts, policy = case
    plan = make_plan(facts, policy)
    present = {u.name for u in facts.units}
    for c in plan.changes + plan.unchanged:
        if c.knob == "unit":
            assert c.unit in present
            assert not catalogue.is_never_touch(c.unit or "", policy["services"]["never_touch"])


@PROPS
@given(cases())
def test_units_only_where_systemd_runs(case: tuple[Facts, Policy]) -> None:
    """Only systemd changes units: without it the helper refuses a plan holding any, so there are none."""
    facts, policy = case
    plan = make_plan(facts, policy)
    units = [c for c in plan.changes + plan.unchanged if c.knob == "unit"]
    if not facts.systemd_running:
        assert units == []
        if policy["services"]["disable"] or policy["services"]["mask"]:
            assert any("systemd is not PID 1" in n for n in plan.notes)


# ---- purity and determinism ---------------------------------------------------------------------


@PROPS
@given(cases())
def test_plan_is_deterministic_and_pure(case: tuple[Facts, Policy]) -> None:
    facts, policy = case
    facts_before, policy_before = facts.to_json(), copy.deepcopy(policy.values)
    first = plan_json(make_plan(facts, policy))
    assert plan_json(make_plan(facts, policy)) == first
    assert facts.to_json() == facts_before and policy.values == policy_before  # nothing mutated
    again = facts_from_json(facts.to_json(), "round trip")
    assert again == facts
    assert plan_json(make_plan(again, policy)) == first


@PROPS
@given(zswap_asked_cases())
def test_an_earlier_swap_file_is_planned_at_its_own_size(case: tuple[Facts, Policy]) -> None:
    """After a reboot the earlier apply's swap file is there, inactive, and took free space: planning its size from
    the space left gave another size, which the helper refused, so the boot unit failed (seen on the guest)."""
    facts, policy = case
    first = [c for c in make_plan(facts, policy).changes if c.knob == "swap.file"]
    if not first:
        return
    path = first[0].path
    assert path is not None
    mounts = [m if mount_for(path, facts.mounts) is not m else dataclasses.replace(m, free_mib=max(0, (m.free_mib or 0)
              - int(first[0].target))) for m in facts.mounts]
    after = dataclasses.replace(facts, mounts=mounts, swap_files={path: int(first[0].target)})
    [again] = [c for c in make_plan(after, policy).changes if c.knob == "swap.file"]
    assert (again.path, again.target) == (path, first[0].target)

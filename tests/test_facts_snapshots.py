"""The facts collector on real machine snapshots (../shared/hosts/*.tgz), checked against what
lscpu and lsblk printed on the same machines (cmd/ beside root/ in each snapshot)."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from autoglm_tune.collect import Reader, block_device, collect_facts, mount_for, parse_cpulist
from autoglm_tune.facts import Facts, facts_from_json
from trees import host_snapshots, snapshot_names

GIB_KIB = 1024 * 1024


@pytest.fixture(scope="session")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return host_snapshots(tmp_path_factory)


@pytest.fixture(params=snapshot_names())
def snap(request: pytest.FixtureRequest, snapshots: dict[str, Path]) -> Path:
    if request.param not in snapshots:
        pytest.fail(f"snapshot {request.param} was listed but not extracted")
    return snapshots[request.param]


_facts_cache: dict[Path, Facts] = {}


def facts_of(snap: Path) -> Facts:
    if snap not in _facts_cache:
        _facts_cache[snap] = collect_facts(snap / "root")
    return _facts_cache[snap]


def lscpu(snap: Path) -> dict[str, str]:
    """`lscpu -J` as field → data, without the trailing colon."""
    data = json.loads((snap / "cmd/lscpu.json").read_text())
    return {row["field"].rstrip(":"): row["data"] for row in data["lscpu"]}


def lscpu_e(snap: Path) -> list[dict[str, str]]:
    """`lscpu -e` as one dict per CPU row, keyed by the header words."""
    lines = (snap / "cmd/lscpu-e.txt").read_text().splitlines()
    header = lines[0].split()
    rows = [dict(zip(header, line.split(), strict=True)) for line in lines[1:] if line.strip()]
    assert rows, "lscpu -e printed no CPUs"
    return rows


def lsblk_devices(snap: Path) -> list[dict[str, Any]]:
    """Every device `lsblk -J -O` printed, children included."""
    out: list[dict[str, Any]] = []

    def walk(devs: list[dict[str, Any]]) -> None:
        for d in devs:
            out.append(d)
            walk(d.get("children") or [])

    walk(json.loads((snap / "cmd/lsblk.json").read_text())["blockdevices"])
    assert out, "lsblk printed no block devices"
    return out


def expected_class(dev: dict[str, Any]) -> str:
    """The device class lsblk implies: by name for zram/nvme/mmc/loop, else by its `rota` flag."""
    name = dev["kname"]
    for prefix, cls in (("zram", "zram"), ("nvme", "nvme"), ("mmcblk", "mmc"), ("loop", "unknown")):
        if name.startswith(prefix):
            return cls
    return "hdd" if dev["rota"] else "ssd"


# ---- CPU ----------------------------------------------------------------------------------------


def test_online_cpus_match_lscpu(snap: Path) -> None:
    f, info = facts_of(snap), lscpu(snap)
    assert f.cpu.online == parse_cpulist(info["On-line CPU(s) list"])
    assert len(f.cpu.online) == int(info["CPU(s)"])
    assert [c.id for c in f.cpu.cpus] == f.cpu.online


def test_online_cpus_match_lscpu_e(snap: Path) -> None:
    rows = lscpu_e(snap)
    online = sorted(int(r["CPU"]) for r in rows if r["ONLINE"] == "yes")
    assert facts_of(snap).cpu.online == online


def test_physical_cores_match_lscpu_e(snap: Path) -> None:
    """CPUs lscpu puts on one (socket, core) are exactly the CPUs the facts give one `core`."""
    f = facts_of(snap)
    lscpu_groups: dict[tuple[str, str], set[int]] = defaultdict(set)
    for r in lscpu_e(snap):
        if r["ONLINE"] == "yes":
            lscpu_groups[(r["SOCKET"], r["CORE"])].add(int(r["CPU"]))
    facts_groups: dict[str, set[int]] = defaultdict(set)
    for c in f.cpu.cpus:
        facts_groups[c.core].add(c.id)
    assert sorted(map(sorted, facts_groups.values())) == sorted(map(sorted, lscpu_groups.values()))
    for core, members in facts_groups.items():
        assert parse_cpulist(core) == sorted(members), f"core {core!r} does not list its own CPUs"


def test_sockets_and_packages_match_lscpu(snap: Path) -> None:
    f, info = facts_of(snap), lscpu(snap)
    rows = {int(r["CPU"]): r for r in lscpu_e(snap)}
    for c in f.cpu.cpus:
        assert c.package == int(rows[c.id]["SOCKET"]), f"cpu{c.id}"
    assert len({c.package for c in f.cpu.cpus}) == int(info["Socket(s)"])
    cores = {c.core for c in f.cpu.cpus}
    assert len(cores) == int(info["Core(s) per socket"]) * int(info["Socket(s)"])
    threads_per_core = max(len(parse_cpulist(core)) for core in cores)
    assert threads_per_core == int(info["Thread(s) per core"])


def test_cpu_kinds_on_non_hybrid_snapshots(snap: Path) -> None:
    """lscpu reports one thread per core and one core type: every CPU is "standard", none hybrid."""
    f = facts_of(snap)
    assert not f.cpu.hybrid
    assert {c.kind for c in f.cpu.cpus} == {"standard"}


def test_numa_nodes_match_lscpu(snap: Path) -> None:
    f, info = facts_of(snap), lscpu(snap)
    assert len(f.cpu.numa_nodes) == int(info["NUMA node(s)"])
    for key, value in info.items():
        m = re.fullmatch(r"NUMA (node\d+) CPU\(s\)", key)
        if m:
            assert f.cpu.numa_nodes[m.group(1)] == parse_cpulist(value)
    by_node: dict[str, list[int]] = defaultdict(list)
    for r in lscpu_e(snap):
        by_node[f"node{r['NODE']}"].append(int(r["CPU"]))
    assert f.cpu.numa_nodes == {k: sorted(v) for k, v in by_node.items()}


def test_cpu_model_matches_lscpu(snap: Path) -> None:
    assert facts_of(snap).cpu.model == lscpu(snap)["Model name"]


# ---- memory -------------------------------------------------------------------------------------


def test_memory_total_matches_the_machine(snap: Path) -> None:
    """Neither lscpu nor lsblk reports RAM; the snapshot's name does ("…-24g") and /proc/meminfo
    sizes are kB: within 1 GiB of the name, and available ≤ total."""
    m = facts_of(snap).memory
    match = re.search(r"-(\d+)g(?:-|$)", snap.name)
    assert match, f"snapshot name {snap.name} names no memory size"
    assert m.total_kib is not None and m.available_kib is not None
    assert abs(m.total_kib / GIB_KIB - int(match.group(1))) < 1.0
    assert 0 < m.available_kib <= m.total_kib


def test_cpu_count_matches_snapshot_name(snap: Path) -> None:
    match = re.search(r"-(\d+)cpu-", snap.name)
    assert match, f"snapshot name {snap.name} names no CPU count"
    assert len(facts_of(snap).cpu.online) == int(match.group(1))


# ---- block devices, mounts, swap -----------------------------------------------------------------


def test_block_device_classes_match_lsblk_rota(snap: Path) -> None:
    r = Reader(snap / "root")
    for dev in lsblk_devices(snap):
        disk, cls = block_device(r, dev["kname"])
        assert cls == expected_class(dev), f"{dev['kname']}: rota={dev['rota']}"
        assert disk == (dev.get("pkname") or dev["kname"])


def test_mounted_devices_match_lsblk(snap: Path) -> None:
    """Where a mount point lsblk shows is also in the snapshot's mount table, the facts name the same
    device and class; the root file system must be among them."""
    f = facts_of(snap)
    matched = []
    for dev in lsblk_devices(snap):
        for mp in dev.get("mountpoints") or []:
            if mp is None or mp == "[SWAP]":
                continue
            mount = next((m for m in f.mounts if m.mount_point == mp), None)
            if mount is None:
                continue  # lsblk ran in another mount namespace (e.g. a bind mount into a container)
            assert mount.device == (dev.get("pkname") or dev["kname"]), mp
            assert mount.device_class == expected_class(dev), mp
            matched.append(mp)
    assert "/" in matched
    # where a swap file would go: the longest lsblk mount point holding the directory
    target = "/var/lib/autoglm-tune/swap"
    holders = [mp for mp in matched if mp == "/" or target.startswith(mp.rstrip("/") + "/")]
    mount = mount_for(target, f.mounts)
    assert mount is not None and mount.mount_point == max(holders, key=len)


def test_zram_device_present_as_lsblk_says(snap: Path) -> None:
    r = Reader(snap / "root")
    zrams = [d for d in lsblk_devices(snap) if d["kname"].startswith("zram")]
    for dev in zrams:
        assert r.exists(f"sys/class/block/{dev['kname']}")
        assert block_device(r, dev["kname"]) == (dev["kname"], "zram")
    listed = {d.name for d in (snap / "root/sys/class/block").iterdir() if d.name.startswith("zram")}
    assert listed == {d["kname"] for d in zrams}


def test_swap_areas_match_lsblk_swap_mounts(snap: Path) -> None:
    """lsblk marks an active swap partition with the mount point [SWAP]; the facts' partition swap
    areas are exactly those, and the swap total agrees with /proc/meminfo."""
    f = facts_of(snap)
    lsblk_swap = {d["kname"] for d in lsblk_devices(snap) if "[SWAP]" in (d.get("mountpoints") or [])}
    facts_swap = {a.area.removeprefix("/dev/") for a in f.swaps if a.type == "partition"}
    assert facts_swap == lsblk_swap
    meminfo = (snap / "root/proc/meminfo").read_text()
    swap_total = int(re.search(r"^SwapTotal:\s+(\d+)", meminfo, re.M).group(1))  # type: ignore[union-attr]
    assert sum(a.size_kib for a in f.swaps) == swap_total
    zram_in_use = {a.device for a in f.swaps if a.device_class == "zram"}
    assert zram_in_use == {name for name in lsblk_swap if name.startswith("zram")}


# ---- the whole --------------------------------------------------------------------------------


def test_snapshot_facts_survive_a_json_round_trip(snap: Path) -> None:
    f = facts_of(snap)
    again = facts_from_json(f.to_json(), "round trip")
    assert again == f
    assert again.to_json() == f.to_json()


def test_snapshot_facts_have_no_unexplained_gaps(snap: Path) -> None:
    """Every file the collector needs is in the snapshots: no notes, every managed sysctl read."""
    f = facts_of(snap)
    assert f.notes == []
    assert f.kernel and re.fullmatch(r"\d+\.\d+[\w.+-]*", f.kernel)
    for knob in ("vm.swappiness", "vm.vfs_cache_pressure", "vm.page-cluster"):
        assert f.knobs[knob].lstrip("-").isdigit(), knob
    assert f.zswap.present and {"enabled", "compressor", "max_pool_percent"} <= set(f.zswap.parameters)
    assert f.zswap.compressors_available, "no compressor read from /proc/crypto"
    assert f.cgroup.layout in ("v1", "v2", "hybrid")

"""The facts collector on hand-made trees (tests/trees.py): machine shapes the real snapshots lack."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
from autoglm_tune.collect import Reader, block_device, collect_facts, mount_for, parse_cpulist
from autoglm_tune.facts import DEVICE_CLASSES, Facts, facts_from_json
from trees import GIB_KIB, TREES, Tree, build_tree, built_trees, cpulist


@pytest.fixture(scope="session")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return built_trees(tmp_path_factory)


@pytest.fixture(scope="session")
def facts(roots: dict[str, Path]) -> dict[str, Facts]:
    return {name: collect_facts(root) for name, root in roots.items()}


def cores_of(f: Facts) -> list[list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for c in f.cpu.cpus:
        groups[c.core].append(c.id)
    return sorted(sorted(g) for g in groups.values())


def kinds_of(f: Facts) -> dict[str, list[int]]:
    kinds: dict[str, list[int]] = defaultdict(list)
    for c in f.cpu.cpus:
        kinds[c.kind].append(c.id)
    return dict(kinds)


def swaps_of(f: Facts) -> list[tuple[str, str, str | None, str, int]]:
    return [(a.area, a.type, a.device, a.device_class, a.priority) for a in f.swaps]


def mounts_of(f: Facts) -> dict[str, tuple[str | None, str]]:
    return {m.mount_point: (m.device, m.device_class) for m in f.mounts}


# ---- helpers of the tree writer ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpus", "text"),
    [([0, 1, 2, 3], "0-3"), ([0, 2], "0,2"), ([0, 1, 2, 4, 6, 7], "0-2,4,6-7"), ([5], "5"), ([], "")],
)
def test_cpulist_writes_what_the_collector_reads(cpus: list[int], text: str) -> None:
    assert cpulist(cpus) == text
    assert parse_cpulist(text) == cpus


def test_tree_links_are_relative_and_resolve_inside_the_tree(roots: dict[str, Path]) -> None:
    root = roots["nvme-hdd-swap"]
    link = root / "sys/class/block/sda2"
    assert link.is_symlink() and not Path(link.readlink()).is_absolute()
    sata = "/sys/devices/pci0000:00/0000:00:17.0/ata1/host0/target0:0:0/0:0:0:0"
    assert Reader(root).resolve("sys/class/block/sda2") == f"{sata}/block/sda/sda2"
    assert Reader(root).resolve("sys/dev/block/259:2") == Reader(root).resolve("sys/class/block/nvme0n1p2")


# ---- every tree -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TREES))
def test_tree_facts_are_consistent(name: str, facts: dict[str, Facts]) -> None:
    f = facts[name]
    assert f.hostname and f.kernel
    assert [c.id for c in f.cpu.cpus] == f.cpu.online
    for c in f.cpu.cpus:
        assert c.id in parse_cpulist(c.core)
    for group in cores_of(f):
        assert parse_cpulist(next(c.core for c in f.cpu.cpus if c.id == group[0])) == group
    assert all(a.device_class in DEVICE_CLASSES and a.device_class != "unknown" for a in f.swaps)
    assert all(m.device_class != "unknown" and m.free_mib is None for m in f.mounts)
    assert f.memory.total_kib and f.memory.psi_some is not None and f.memory.psi_some.avg60 == 0.12
    assert f.cgroup.layout in ("v1", "v2")


@pytest.mark.parametrize("name", list(TREES))
def test_tree_facts_survive_a_json_round_trip(name: str, facts: dict[str, Facts]) -> None:
    f = facts[name]
    assert facts_from_json(f.to_json(), name) == f


@pytest.mark.parametrize("name", sorted(set(TREES) - {"no-zswap-kernel", "lxc-container"}))
def test_tree_facts_have_no_notes(name: str, facts: dict[str, Facts]) -> None:
    assert facts[name].notes == []


# ---- one tree each ----------------------------------------------------------------------------


def test_smt_siblings_numbered_n_and_n_plus_2(facts: dict[str, Facts]) -> None:
    f = facts["smt-2c4t"]
    assert f.cpu.online == [0, 1, 2, 3]
    assert cores_of(f) == [[0, 2], [1, 3]]
    assert {c.id: c.core for c in f.cpu.cpus} == {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"}
    assert not f.cpu.hybrid and kinds_of(f) == {"standard": [0, 1, 2, 3]}
    assert f.swaps == []
    assert mounts_of(f) == {"/": ("sda", "ssd"), "/boot/efi": ("sda", "ssd")}
    assert f.memory.total_kib == 8 * GIB_KIB - 262144


def test_hybrid_2p_8e(facts: dict[str, Facts]) -> None:
    f = facts["hybrid-2p8e"]
    assert f.cpu.hybrid
    assert kinds_of(f) == {"performance": [0, 1, 2, 3], "efficiency": [4, 5, 6, 7, 8, 9, 10, 11]}
    assert cores_of(f) == [[0, 1], [2, 3], [4], [5], [6], [7], [8], [9], [10], [11]]
    assert all(c.capacity is None for c in f.cpu.cpus)
    assert swaps_of(f) == [("/swap.img", "file", "nvme0n1", "nvme", -2)]
    assert f.cpu.model == "12th Gen Intel(R) Core(TM) i5-1235U"


def test_nvme_and_hdd_swap_with_hdd_preferred(facts: dict[str, Facts]) -> None:
    f = facts["nvme-hdd-swap"]
    assert swaps_of(f) == [
        ("/dev/sda2", "partition", "sda", "hdd", 5),
        ("/swapfile", "file", "nvme0n1", "nvme", -2),
    ]
    assert f.swaps[0].used_kib == 524288 and f.swaps[1].size_kib == 2097148
    assert mounts_of(f) == {
        "/": ("nvme0n1", "nvme"),
        "/boot/efi": ("nvme0n1", "nvme"),
        "/srv/data": ("sda", "hdd"),
    }
    # siblings from the older thread_siblings_list (no core_cpus_list in this tree)
    assert cores_of(f) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert "shrinker_enabled" not in f.zswap.parameters and "zswap.shrinker_enabled" not in f.knobs


def test_zram_active(facts: dict[str, Facts]) -> None:
    f = facts["zram-active"]
    assert swaps_of(f) == [
        ("/dev/zram0", "partition", "zram0", "zram", 100),
        ("/dev/nvme0n1p3", "partition", "nvme0n1", "nvme", -2),
    ]
    assert [(t.name, t.evidence, t.enabled) for t in f.tuners] == [
        ("zram-generator", "/usr/lib/systemd/system-generators/zram-generator", None)
    ]
    assert f.knobs["zswap.enabled"] == "Y"


def test_no_swap_and_4_gib(facts: dict[str, Facts]) -> None:
    f = facts["no-swap-4g"]
    assert f.swaps == []
    assert f.memory.total_kib == 4 * GIB_KIB - 180000 and f.memory.available_kib == 2500000
    assert cores_of(f) == [[0], [1]]
    assert {u.name: u.state for u in f.units} == {
        "ModemManager.service": "masked",
        "bluetooth.service": "disabled",
        "cups.service": "enabled",
        "cups.socket": "enabled",
        "fwupd-refresh.timer": "static",
        "ssh.service": "enabled",
        "tlp.service": "enabled",
    }
    assert all(u.source == "files" and u.active is None for u in f.units)
    assert [(t.name, t.enabled) for t in f.tuners] == [("tlp", True)]
    assert f.systemd_running


def test_btrfs_swap_file_found_through_the_mount_source(facts: dict[str, Facts]) -> None:
    """btrfs mounts carry an anonymous device (major 0): the class comes from the mount source."""
    f = facts["btrfs-swapfile"]
    assert swaps_of(f) == [("/swap/swapfile", "file", "nvme0n1", "nvme", -2)]
    assert mounts_of(f) == {
        "/": ("nvme0n1", "nvme"),
        "/swap": ("nvme0n1", "nvme"),
        "/home": ("sda", "hdd"),
        "/boot": ("nvme0n1", "nvme"),
    }
    m = mount_for("/swap/swapfile", f.mounts)
    assert m is not None and m.mount_point == "/swap" and m.fstype == "btrfs" and m.source == "/dev/nvme0n1p2"
    home = mount_for("/home/user/swapfile", f.mounts)
    assert home is not None and home.device_class == "hdd"
    assert cores_of(f) == [[2 * i, 2 * i + 1] for i in range(6)]


def test_dm_crypt_swap_over_nvme(facts: dict[str, Facts]) -> None:
    f = facts["dm-crypt-swap"]
    assert swaps_of(f) == [("/dev/dm-0", "partition", "dm-0", "nvme", -2)]
    # LVM root over an HDD partition: the slowest device underneath wins over the dm queue's
    # claim of being non-rotational
    assert mounts_of(f) == {"/": ("dm-1", "hdd"), "/boot": ("nvme0n1", "nvme")}
    assert f.cgroup.layout == "v1" and f.cgroup.memory_controller == "v1"


def test_dm_crypt_swap_by_mapper_name(facts: dict[str, Facts]) -> None:
    f = facts["dm-crypt-swap-by-name"]
    assert swaps_of(f) == [("/dev/mapper/cryptswap", "partition", "dm-0", "nvme", 10)]
    assert f.knobs["zswap.max_pool_percent"] == "536870912"


def test_arm_big_little_capacities(facts: dict[str, Facts]) -> None:
    f = facts["arm-big-little"]
    assert not f.cpu.hybrid  # no Intel PMU folders: the kinds come from cpu_capacity
    assert kinds_of(f) == {"efficiency": [0, 1, 2, 3], "performance": [4, 5, 6, 7]}
    assert {c.id: c.capacity for c in f.cpu.cpus} == {n: 414 if n < 4 else 1024 for n in range(8)}
    assert cores_of(f) == [[n] for n in range(8)]
    assert mounts_of(f) == {"/": ("mmcblk0", "mmc"), "/boot": ("mmcblk0", "mmc")}
    assert f.zswap.compressors_available == ["lz4", "lzo", "lzo-rle"]


def test_kernel_without_zswap(facts: dict[str, Facts]) -> None:
    f = facts["no-zswap-kernel"]
    assert not f.zswap.present and f.zswap.parameters == []
    assert not any(k.startswith("zswap.") for k in f.knobs)
    assert f.notes == ["/sys/module/zswap/parameters: absent; this kernel has no zswap"]
    assert swaps_of(f) == [("/dev/sda2", "partition", "sda", "ssd", -2)]
    assert f.knobs["vm.swappiness"] == "30"


def test_kernel_with_the_old_zpool_parameter(facts: dict[str, Facts]) -> None:
    f = facts["old-zpool-kernel"]
    assert f.zswap.present
    assert f.zswap.parameters == sorted(
        ["accept_threshold_percent", "compressor", "enabled", "max_pool_percent", "same_filled_pages_enabled", "zpool"]
    )
    assert "zswap.shrinker_enabled" not in f.knobs
    assert f.zswap.compressors_available == ["deflate", "lzo", "lzo-rle"]  # sha256 is not a compressor
    assert {c.id: c.package for c in f.cpu.cpus} == {n: n // 4 for n in range(8)}
    assert f.cpu.numa_nodes == {"node0": [0, 1, 2, 3], "node1": [4, 5, 6, 7]}
    # a swap file whose path holds a space: /proc/swaps writes it as \040
    assert swaps_of(f) == [
        ("/dev/sda2", "partition", "sda", "hdd", -2),
        ("/var/lib/models/swap\\040file", "file", "sdb", "ssd", -3),
    ]


def test_lxc_virtual_swap_line_is_left_out(facts: dict[str, Facts]) -> None:
    """lxcfs writes the container's swap limit as "none virtual …": no area the helper could act on."""
    f = facts["lxc-container"]
    assert f.swaps == []
    assert f.notes == ["swap area none: type 'virtual' is neither a partition nor a file; left out"]
    assert mounts_of(f) == {"/": ("dm-5", "nvme")}


def test_block_device_classes_in_trees(roots: dict[str, Path]) -> None:
    r = Reader(roots["dm-crypt-swap"])
    assert block_device(r, "nvme0n1p3") == ("nvme0n1", "nvme")
    assert block_device(r, "sda") == ("sda", "hdd")
    assert block_device(r, "sda1") == ("sda", "hdd")
    assert block_device(r, "dm-0") == ("dm-0", "nvme")
    assert block_device(r, "dm-1") == ("dm-1", "hdd")
    assert block_device(r, "nope") == (None, "unknown")
    assert block_device(Reader(roots["zram-active"]), "zram0") == ("zram0", "zram")
    assert block_device(Reader(roots["arm-big-little"]), "mmcblk0p2") == ("mmcblk0", "mmc")


# ---- degraded trees ---------------------------------------------------------------------------


def test_almost_empty_tree_degrades_to_unknown_with_notes(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    f = collect_facts(tmp_path)
    assert f.cpu.online == [] and f.memory.total_kib is None and f.swaps == [] and not f.zswap.present
    assert f.cgroup.layout == "unknown"
    for needle in ("/proc/meminfo", "/proc/swaps", "/proc/self/mountinfo", "/sys/devices/system/cpu/online"):
        assert any(n.startswith(needle) for n in f.notes), needle


def test_swap_on_an_unknown_device_is_noted(tmp_path: Path) -> None:
    t = Tree(tmp_path / "t")
    t.base(hostname="odd", kernel="6.8.0", mem_total_kib=2 * GIB_KIB, zswap=None)
    t.cpus([[0]], model="x")
    t.swap("/dev/sdz9", "partition", 1024, 0, -2)  # no such device in /sys
    t.swap("/nowhere/swapfile", "file", 1024, 0, -3)  # no mount table entry covers it
    t.finish()
    f = collect_facts(t.root)
    assert swaps_of(f) == [
        ("/dev/sdz9", "partition", None, "unknown", -2),
        ("/nowhere/swapfile", "file", None, "unknown", -3),
    ]
    assert "swap area /dev/sdz9: device class unknown" in f.notes
    assert "swap area /nowhere/swapfile: device class unknown" in f.notes


def test_offline_cpus_are_left_out(tmp_path: Path) -> None:
    t = Tree(tmp_path / "t")
    t.base(hostname="offline", kernel="6.8.0", mem_total_kib=8 * GIB_KIB, zswap=None)
    t.cpus([[0, 2], [1, 3]], model="x", online=[0, 1, 2])
    t.finish()
    f = collect_facts(t.root)
    assert f.cpu.online == [0, 1, 2] and [c.id for c in f.cpu.cpus] == [0, 1, 2]


def test_build_tree_refuses_to_overwrite(tmp_path: Path) -> None:
    build_tree("smt-2c4t", tmp_path / "a")
    with pytest.raises(FileExistsError):
        build_tree("smt-2c4t", tmp_path / "a")


def test_compressors_built_as_modules_and_not_loaded_are_named_with_how_to_load_them(tmp_path: Path) -> None:
    """Debian 13's 6.12 ships lz4 and zstd as modules (seen in the guest suite): they are not in /proc/crypto
    until loaded, so they are not available, and the facts say how to make them so."""
    root = build_tree("no-swap-4g", tmp_path / "root")
    release = (root / "proc/sys/kernel/osrelease").read_text().strip()
    crypto = root / "lib/modules" / release / "kernel/crypto"
    crypto.mkdir(parents=True)
    for name in ("zstd.ko.xz", "lz4.ko.xz", "lzo.ko", "aes_generic.ko.xz"):
        (crypto / name).write_bytes(b"")
    entries = (root / "proc/crypto").read_text().split("\n\n")
    (root / "proc/crypto").write_text("\n\n".join(e for e in entries if "zstd" not in e and "lz4" not in e))
    f = collect_facts(str(root))
    assert "zstd" not in f.zswap.compressors_available and "lz4" not in f.zswap.compressors_available
    assert f.notes == ["zswap compressors lz4, zstd: kernel modules not loaded, so not usable yet; "
                       "'sudo modprobe zstd' loads one now, a line in /etc/modules-load.d/ at every boot"]

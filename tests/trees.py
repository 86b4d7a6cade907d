"""Snapshot trees for the facts and planner tests.

Two kinds:
- the real host snapshots in ../shared/hosts/*.tgz (each holds root/ and cmd/), extracted once
  per session by `host_snapshots`;
- hand-made trees for machine shapes those snapshots lack, written file by file with `Tree`,
  laid out as the kernel lays out /proc and /sys (symlinks included), one builder per shape in
  `TREES`.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOSTS_DIR = REPO.parent / "shared" / "hosts"

GIB_KIB = 1024 * 1024


# ---- the real host snapshots ----------------------------------------------------------------


def host_tarballs() -> list[Path]:
    return sorted(HOSTS_DIR.glob("*.tgz"))


def snapshot_names() -> list[str]:
    """Names of the host snapshots, for parametrizing; one placeholder when there are none, so the
    tests run (and fail or skip in `host_snapshots`) instead of being silently deselected."""
    return [p.name.removesuffix(".tgz") for p in host_tarballs()] or ["<no snapshots found>"]


def no_snapshots() -> None:
    """Skip the calling test on a developer machine without ../shared; fail it under CI=true."""
    message = f"no host snapshots at {HOSTS_DIR} (CI clones the repo with shared/ beside it)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


_extracted: dict[str, Path] = {}


def host_snapshots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Extract every host snapshot (once per session); name → folder holding root/ and cmd/.

    A missing ../shared/hosts is a skip on a developer machine and a failure under CI=true.
    """
    tarballs = host_tarballs()
    if not tarballs:
        no_snapshots()
    if not _extracted:
        base = tmp_path_factory.mktemp("hosts")
        for tgz in tarballs:
            name = tgz.name.removesuffix(".tgz")
            dest = base / name
            dest.mkdir()
            with tarfile.open(tgz) as tar:
                # the "data" filter arrived in Python 3.11.4; Debian 12 ships 3.11.2
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(dest, **safe)
            assert (dest / "root").is_dir() and (dest / "cmd").is_dir(), f"{tgz}: expected root/ and cmd/"
            _extracted[name] = dest
    return _extracted


# ---- a tree writer --------------------------------------------------------------------------

PCI_NVME = "pci0000:00/0000:00:1d.0/0000:3d:00.0/nvme/nvme0"
PCI_SATA = "pci0000:00/0000:00:17.0/ata1/host0/target0:0:0/0:0:0:0"
PCI_SATA2 = "pci0000:00/0000:00:17.0/ata2/host1/target1:0:0/1:0:0:0"
PLATFORM_MMC = "platform/fe2e0000.mmc/mmc_host/mmc0/mmc0:0001"
VIRTUAL = "virtual"

MODERN_ZSWAP = {
    "enabled": "N",
    "compressor": "lzo",
    "max_pool_percent": "20",
    "accept_threshold_percent": "90",
    "shrinker_enabled": "N",
}
DEFAULT_VM = {
    "swappiness": "60",
    "vfs_cache_pressure": "100",
    "page-cluster": "3",
    "watermark_scale_factor": "10",
    "watermark_boost_factor": "15000",
    "compaction_proactiveness": "20",
}


class Tree:
    """Writes a tree laid out like / under `root`. Call `finish()` last: it writes the files that
    collect lines from several calls (/proc/self/mountinfo, /proc/swaps)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._mountinfo: list[str] = []
        self._swaps: list[str] = []
        self._mount_id = 20

    # -- primitives --

    def write(self, rel: str, text: str) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text if text.endswith("\n") or not text else text + "\n")

    def link(self, rel: str, target_rel: str) -> None:
        """A relative symlink at `rel` pointing at `target_rel` (both relative to the root)."""
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(self.root / target_rel, path.parent), path)

    # -- kernel, memory, zswap, sysctls --

    def base(
        self,
        *,
        hostname: str,
        kernel: str,
        mem_total_kib: int,
        mem_available_kib: int | None = None,
        compressors: tuple[str, ...] = ("deflate", "lz4", "lzo", "lzo-rle", "zstd"),
        zswap: dict[str, str] | None = None,
        vm: dict[str, str] | None = None,
        cgroup: str = "v2",
        systemd: bool = True,
    ) -> None:
        self.write("proc/sys/kernel/hostname", hostname)
        self.write("proc/sys/kernel/osrelease", kernel)
        self.write("proc/version", f"Linux version {kernel} (builder@example) #1 SMP PREEMPT_DYNAMIC")
        available = mem_available_kib if mem_available_kib is not None else mem_total_kib * 3 // 4
        self.write(
            "proc/meminfo",
            f"MemTotal:       {mem_total_kib} kB\n"
            f"MemFree:        {available // 2} kB\n"
            f"MemAvailable:   {available} kB\n"
            "SwapCached:            0 kB\n"
            "Zswap:                 0 kB\n"
            "Zswapped:              0 kB\n",
        )
        self.write(
            "proc/pressure/memory",
            "some avg10=0.00 avg60=0.12 avg300=0.05 total=123456\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=2345",
        )
        entries = [
            # something that is not a compressor: the collector must skip it
            "name         : sha256\ndriver       : sha256-generic\nmodule       : kernel\n"
            "priority     : 100\nrefcnt       : 1\nselftest     : passed\ninternal     : no\n"
            "type         : shash\nblocksize    : 64\ndigestsize   : 32\n"
        ]
        for name in compressors:
            entries.append(
                f"name         : {name}\ndriver       : {name}-scomp\nmodule       : kernel\n"
                "priority     : 0\nrefcnt       : 1\nselftest     : passed\ninternal     : no\n"
                "type         : scomp\n"
            )
        self.write("proc/crypto", "\n".join(entries))
        for name, value in (DEFAULT_VM if vm is None else vm).items():
            self.write(f"proc/sys/vm/{name}", value)
        if zswap is not None:
            for name, value in zswap.items():
                self.write(f"sys/module/zswap/parameters/{name}", value)
        self.write("sys/kernel/mm/transparent_hugepage/enabled", "always [madvise] never")
        self.write("sys/kernel/mm/transparent_hugepage/defrag", "always defer defer+madvise [madvise] never")
        if cgroup == "v2":
            self.mount("0:26", "/sys/fs/cgroup", "cgroup2", "cgroup2", super_opts="rw,nsdelegate")
            self.write("sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory hugetlb pids rdma misc")
        else:
            self.mount("0:26", "/sys/fs/cgroup", "tmpfs", "tmpfs")
            self.mount("0:27", "/sys/fs/cgroup/memory", "cgroup", "cgroup", super_opts="rw,memory")
            self.mount("0:28", "/sys/fs/cgroup/cpu,cpuacct", "cgroup", "cgroup", super_opts="rw,cpu,cpuacct")
        self.mount("0:21", "/proc", "proc", "proc")
        self.mount("0:22", "/sys", "sysfs", "sysfs")
        self.mount("0:5", "/dev", "devtmpfs", "udev")
        if systemd:
            (self.root / "run/systemd/system").mkdir(parents=True, exist_ok=True)

    # -- CPUs --

    def cpus(
        self,
        cores: list[list[int]],
        *,
        model: str,
        siblings_file: str = "core_cpus_list",
        capacities: dict[int, int] | None = None,
        packages: dict[int, int] | None = None,
        numa: dict[int, list[int]] | None = None,
        online: list[int] | None = None,
    ) -> None:
        """`cores`: the logical CPUs of each physical core, e.g. [[0, 2], [1, 3]] for cpuN/cpuN+2 SMT."""
        all_cpus = sorted(c for core in cores for c in core)
        base = "sys/devices/system/cpu"
        for core_id, core in enumerate(cores):
            for n in core:
                self.write(f"{base}/cpu{n}/topology/{siblings_file}", cpulist(core))
                self.write(f"{base}/cpu{n}/topology/core_id", str(core_id))
                self.write(f"{base}/cpu{n}/topology/physical_package_id", str((packages or {}).get(n, 0)))
                if capacities is not None:
                    self.write(f"{base}/cpu{n}/cpu_capacity", str(capacities[n]))
        self.write(f"{base}/possible", cpulist(all_cpus))
        self.write(f"{base}/present", cpulist(all_cpus))
        self.write(f"{base}/online", cpulist(online if online is not None else all_cpus))
        self.write(f"{base}/isolated", "")
        for node, node_cpus in (numa or {0: all_cpus}).items():
            self.write(f"sys/devices/system/node/node{node}/cpulist", cpulist(node_cpus))
        self.write(
            "proc/cpuinfo",
            "\n".join(f"processor\t: {n}\nmodel name\t: {model}\nflags\t\t: fpu sse2 avx2\n" for n in all_cpus),
        )

    def hybrid(self, p_cpus: list[int], e_cpus: list[int]) -> None:
        """Intel hybrid PMU folders: P-cores (with their HT siblings) and E-cores."""
        self.write("sys/devices/cpu_core/cpus", cpulist(p_cpus))
        self.write("sys/devices/cpu_atom/cpus", cpulist(e_cpus))

    # -- block devices --

    def disk(
        self,
        name: str,
        majmin: str,
        *,
        rotational: bool,
        parent: str,
        partitions: dict[str, str] | None = None,
        size_sectors: int = 1000215216,
    ) -> None:
        """A whole disk under /sys/devices/<parent>/block/<name> with its partitions (name → MAJ:MIN),
        linked from /sys/class/block, /sys/block and /sys/dev/block as the kernel links them."""
        node = f"sys/devices/{parent}/block/{name}"
        self.write(f"{node}/dev", majmin)
        self.write(f"{node}/size", str(size_sectors))
        self.write(f"{node}/removable", "0")
        self.write(f"{node}/queue/rotational", "1" if rotational else "0")
        (self.root / node / "slaves").mkdir(parents=True, exist_ok=True)
        (self.root / node / "holders").mkdir(parents=True, exist_ok=True)
        self.link(f"sys/class/block/{name}", node)
        self.link(f"sys/block/{name}", node)
        self.link(f"sys/dev/block/{majmin}", node)
        for number, (part, part_majmin) in enumerate(sorted((partitions or {}).items()), start=1):
            pnode = f"{node}/{part}"
            self.write(f"{pnode}/partition", str(number))
            self.write(f"{pnode}/dev", part_majmin)
            self.link(f"sys/class/block/{part}", pnode)
            self.link(f"sys/dev/block/{part_majmin}", pnode)

    def zram(self, name: str, majmin: str, disksize: int) -> None:
        self.disk(name, majmin, rotational=False, parent=VIRTUAL)
        self.write(f"sys/devices/virtual/block/{name}/disksize", str(disksize))
        self.write(f"sys/devices/virtual/block/{name}/comp_algorithm", "lzo [lzo-rle] lz4 zstd")

    def dm(self, name: str, majmin: str, *, dm_name: str, slaves: list[str], rotational: bool = False) -> None:
        """A device-mapper device (dm-crypt, LVM) stacked on `slaves` (partition or disk names)."""
        self.disk(name, majmin, rotational=rotational, parent=VIRTUAL)
        node = f"sys/devices/virtual/block/{name}"
        self.write(f"{node}/dm/name", dm_name)
        for slave in slaves:
            target = os.path.relpath(os.path.realpath(self.root / "sys/class/block" / slave), self.root)
            self.link(f"{node}/slaves/{slave}", target)

    # -- mounts and swap --

    def mount(
        self,
        majmin: str,
        mount_point: str,
        fstype: str,
        source: str,
        *,
        fs_root: str = "/",
        super_opts: str = "rw",
    ) -> None:
        self._mount_id += 1
        esc = mount_point.replace("\\", "\\134").replace(" ", "\\040")
        self._mountinfo.append(
            f"{self._mount_id} 1 {majmin} {fs_root} {esc} rw,relatime shared:{self._mount_id} - "
            f"{fstype} {source} {super_opts}"
        )

    def swap(self, area: str, kind: str, size_kib: int, used_kib: int, priority: int) -> None:
        """One /proc/swaps line; `area` as the kernel prints it (spaces as \\040)."""
        self._swaps.append(f"{area:<40}{kind:<16}{size_kib:<16}{used_kib:<16}{priority}")

    # -- systemd units and tuners (from files) --

    def unit(
        self,
        name: str,
        *,
        install: str | None = "WantedBy=multi-user.target",
        wanted_by: str | None = None,
        masked: bool = False,
    ) -> None:
        text = f"[Unit]\nDescription={name}\n\n[Service]\nExecStart=/usr/bin/true\n"
        if install:
            text += f"\n[Install]\n{install}\n"
        self.write(f"usr/lib/systemd/system/{name}", text)
        if wanted_by:
            self.link(f"etc/systemd/system/{wanted_by}.wants/{name}", f"usr/lib/systemd/system/{name}")
        if masked:
            path = self.root / "etc/systemd/system" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            os.symlink("/dev/null", path)

    def finish(self) -> None:
        self.write("proc/self/mountinfo", "\n".join(self._mountinfo))
        header = "Filename                                Type            Size            Used            Priority"
        self.write("proc/swaps", "\n".join([header, *self._swaps]))


def cpulist(cpus: list[int]) -> str:
    """[0, 1, 2, 4] → "0-2,4" (the kernel's cpulist format)."""
    out, run = [], []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


# ---- the shapes ------------------------------------------------------------------------------


def smt_2c4t(t: Tree) -> None:
    """Dual-core laptop with HT numbered cpuN/cpuN+2 (cpu0+cpu2, cpu1+cpu3); 8 GiB; SATA SSD; no swap."""
    t.base(
        hostname="smt-laptop", kernel="6.8.0-45-generic", mem_total_kib=8 * GIB_KIB - 262144, zswap=dict(MODERN_ZSWAP)
    )
    t.cpus([[0, 2], [1, 3]], model="Intel(R) Core(TM) i5-7200U CPU @ 2.50GHz")
    t.disk("sda", "8:0", rotational=False, parent=PCI_SATA, partitions={"sda1": "8:1", "sda2": "8:2"})
    t.mount("8:2", "/", "ext4", "/dev/sda2")
    t.mount("8:1", "/boot/efi", "vfat", "/dev/sda1")
    t.finish()


def hybrid_2p8e(t: Tree) -> None:
    """Intel 2P+8E (i5-1235U-like): P-cores with HT are cpu0-3, E-cores cpu4-11; 16 GiB; NVMe swap file."""
    t.base(
        hostname="hybrid-laptop",
        kernel="6.10.14",
        mem_total_kib=16 * GIB_KIB - 400000,
        compressors=("lz4", "lzo", "lzo-rle", "zstd"),
        zswap={**MODERN_ZSWAP, "enabled": "Y", "compressor": "zstd"},
    )
    t.cpus([[0, 1], [2, 3], [4], [5], [6], [7], [8], [9], [10], [11]], model="12th Gen Intel(R) Core(TM) i5-1235U")
    t.hybrid([0, 1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11])
    t.disk(
        "nvme0n1", "259:0", rotational=False, parent=PCI_NVME, partitions={"nvme0n1p1": "259:1", "nvme0n1p2": "259:2"}
    )
    t.mount("259:2", "/", "ext4", "/dev/nvme0n1p2")
    t.mount("259:1", "/boot/efi", "vfat", "/dev/nvme0n1p1")
    t.swap("/swap.img", "file", 4194300, 1024, -2)
    t.finish()


def nvme_hdd_swap(t: Tree) -> None:
    """Desktop, 4 cores / 8 threads numbered cpuN/cpuN+4, siblings only in the old thread_siblings_list;
    16 GiB; a swap partition on the HDD (sda2, priority 5) is preferred over a swap file on the NVMe
    root (-2): the planner must turn that order round."""
    t.base(
        hostname="nvme-hdd-desktop",
        kernel="6.1.0-26-amd64",
        mem_total_kib=16 * GIB_KIB - 500000,
        zswap={k: v for k, v in MODERN_ZSWAP.items() if k != "shrinker_enabled"} | {"zpool": "zsmalloc"},
    )
    t.cpus(
        [[0, 4], [1, 5], [2, 6], [3, 7]],
        model="Intel(R) Core(TM) i7-4770 CPU @ 3.40GHz",
        siblings_file="thread_siblings_list",
    )
    t.disk(
        "nvme0n1", "259:0", rotational=False, parent=PCI_NVME, partitions={"nvme0n1p1": "259:1", "nvme0n1p2": "259:2"}
    )
    t.disk("sda", "8:0", rotational=True, parent=PCI_SATA, partitions={"sda1": "8:1", "sda2": "8:2"})
    t.mount("259:2", "/", "ext4", "/dev/nvme0n1p2")
    t.mount("259:1", "/boot/efi", "vfat", "/dev/nvme0n1p1")
    t.mount("8:1", "/srv/data", "ext4", "/dev/sda1")
    t.swap("/dev/sda2", "partition", 8388604, 524288, 5)
    t.swap("/swapfile", "file", 2097148, 0, -2)
    t.finish()


def zram_active(t: Tree) -> None:
    """zram-generator's zram0 active at priority 100, beside a lower-priority swap partition on
    NVMe; zswap currently on as well (distro default); 8 GiB, 4 cores without SMT."""
    t.base(
        hostname="zram-box",
        kernel="6.11.4-301.fc41.x86_64",
        mem_total_kib=8 * GIB_KIB - 300000,
        zswap={**MODERN_ZSWAP, "enabled": "Y"},
    )
    t.cpus([[0], [1], [2], [3]], model="AMD Ryzen 3 3200G with Radeon Vega Graphics")
    t.zram("zram0", "252:0", 8 * GIB_KIB * 1024)
    t.disk(
        "nvme0n1",
        "259:0",
        rotational=False,
        parent=PCI_NVME,
        partitions={"nvme0n1p1": "259:1", "nvme0n1p2": "259:2", "nvme0n1p3": "259:3"},
    )
    t.mount("259:2", "/", "ext4", "/dev/nvme0n1p2")
    t.swap("/dev/zram0", "partition", 8388604, 1200000, 100)
    t.swap("/dev/nvme0n1p3", "partition", 4194300, 0, -2)
    t.write("usr/lib/systemd/system-generators/zram-generator", "#!/bin/sh\n")
    t.finish()


def no_swap_4g(t: Tree) -> None:
    """4 GiB laptop, 2 cores, SATA SSD, no swap at all, zswap off; some redundant units and tlp installed."""
    t.base(
        hostname="small-laptop",
        kernel="6.8.0-45-generic",
        mem_total_kib=4 * GIB_KIB - 180000,
        mem_available_kib=2500000,
        zswap=dict(MODERN_ZSWAP),
    )
    t.cpus([[0], [1]], model="Intel(R) Celeron(R) N4020 CPU @ 1.10GHz")
    t.disk("sda", "8:0", rotational=False, parent=PCI_SATA, partitions={"sda1": "8:1", "sda2": "8:2"})
    t.mount("8:2", "/", "ext4", "/dev/sda2")
    t.mount("8:1", "/boot/efi", "vfat", "/dev/sda1")
    t.unit("cups.service", wanted_by="multi-user.target")
    t.unit("cups.socket", install="WantedBy=sockets.target", wanted_by="sockets.target")
    t.unit("bluetooth.service", install="WantedBy=bluetooth.target")  # disabled already
    t.unit("ModemManager.service", masked=True)
    t.unit("fwupd-refresh.timer", install=None)  # static: cannot be disabled
    t.unit("ssh.service", wanted_by="multi-user.target")
    t.unit("tlp.service", wanted_by="multi-user.target")
    t.write("usr/sbin/tlp", "#!/bin/sh\n")
    t.finish()


def btrfs_swapfile(t: Tree) -> None:
    """btrfs root and a /swap subvolume on NVMe (anonymous st_dev, major 0 in mountinfo); the swap file
    /swap/swapfile; /home on a separate HDD; 8 GiB; 6 cores / 12 threads numbered in adjacent pairs."""
    t.base(
        hostname="btrfs-box",
        kernel="6.12.1-arch1-1",
        mem_total_kib=8 * GIB_KIB - 350000,
        zswap={**MODERN_ZSWAP, "enabled": "Y", "compressor": "zstd", "shrinker_enabled": "Y"},
        vm={**DEFAULT_VM, "swappiness": "180", "page-cluster": "0"},
    )
    t.cpus([[2 * i, 2 * i + 1] for i in range(6)], model="AMD Ryzen 5 5600G with Radeon Graphics")
    t.disk(
        "nvme0n1", "259:0", rotational=False, parent=PCI_NVME, partitions={"nvme0n1p1": "259:1", "nvme0n1p2": "259:2"}
    )
    t.disk("sda", "8:0", rotational=True, parent=PCI_SATA, partitions={"sda1": "8:1"})
    t.mount("0:31", "/", "btrfs", "/dev/nvme0n1p2", fs_root="/@", super_opts="rw,ssd,subvolid=256,subvol=/@")
    t.mount(
        "0:31", "/swap", "btrfs", "/dev/nvme0n1p2", fs_root="/@swap", super_opts="rw,ssd,subvolid=258,subvol=/@swap"
    )
    t.mount("8:1", "/home", "ext4", "/dev/sda1")
    t.mount("259:1", "/boot", "vfat", "/dev/nvme0n1p1")
    t.swap("/swap/swapfile", "file", 8388604, 65536, -2)
    t.finish()


def dm_crypt_swap(t: Tree) -> None:
    """Encrypted swap (dm-0 "cryptswap") over an NVMe partition, and the root on LVM (dm-1) over an
    HDD partition whose dm queue claims non-rotational; 8 GiB; 4 cores; cgroup v1."""
    t.base(
        hostname="crypt-box",
        kernel="5.15.0-119-generic",
        mem_total_kib=8 * GIB_KIB - 250000,
        zswap={
            "enabled": "N",
            "compressor": "lzo",
            "max_pool_percent": "20",
            "zpool": "zbud",
            "accept_threshold_percent": "90",
            "same_filled_pages_enabled": "Y",
            "non_same_filled_pages_enabled": "Y",
        },
        cgroup="v1",
    )
    t.cpus([[0], [1], [2], [3]], model="Intel(R) Core(TM) i5-6500 CPU @ 3.20GHz")
    t.disk(
        "nvme0n1",
        "259:0",
        rotational=False,
        parent=PCI_NVME,
        partitions={"nvme0n1p1": "259:1", "nvme0n1p2": "259:2", "nvme0n1p3": "259:3"},
    )
    t.disk("sda", "8:0", rotational=True, parent=PCI_SATA, partitions={"sda1": "8:1"})
    t.dm("dm-0", "253:0", dm_name="cryptswap", slaves=["nvme0n1p3"])
    t.dm("dm-1", "253:1", dm_name="vg0-root", slaves=["sda1"])
    t.mount("253:1", "/", "ext4", "/dev/mapper/vg0-root")
    t.mount("259:2", "/boot", "ext4", "/dev/nvme0n1p2")
    t.swap("/dev/dm-0", "partition", 8388604, 0, -2)
    t.finish()


def dm_crypt_swap_by_name(t: Tree) -> None:
    """The same dm-crypt swap, shown in /proc/swaps as /dev/mapper/cryptswap (no /dev in the snapshot:
    the collector must find dm-0 by its dm/name); zswap on with lz4; cgroup v2."""
    t.base(
        hostname="crypt-box-2",
        kernel="6.6.58",
        mem_total_kib=12 * GIB_KIB,
        zswap={**MODERN_ZSWAP, "enabled": "Y", "compressor": "lz4", "max_pool_percent": "536870912"},
    )
    t.cpus([[0, 1], [2, 3]], model="Intel(R) Core(TM) i3-10110U CPU @ 2.10GHz")
    t.disk(
        "nvme0n1",
        "259:0",
        rotational=False,
        parent=PCI_NVME,
        partitions={"nvme0n1p1": "259:1", "nvme0n1p2": "259:2", "nvme0n1p3": "259:3"},
    )
    t.dm("dm-0", "253:0", dm_name="cryptswap", slaves=["nvme0n1p3"])
    t.mount("259:2", "/", "xfs", "/dev/nvme0n1p2")
    t.swap("/dev/mapper/cryptswap", "partition", 8388604, 0, 10)
    t.finish()


def arm_big_little(t: Tree) -> None:
    """RK3588-like board: 4 Cortex-A55 (capacity 414, cpu0-3) + 4 Cortex-A76 (1024, cpu4-7), no SMT;
    eMMC root; 4 GiB; no swap; zswap on with lz4 but nothing to back it."""
    caps = {n: 414 if n < 4 else 1024 for n in range(8)}
    t.base(
        hostname="arm-board",
        kernel="6.1.75-rockchip",
        mem_total_kib=4 * GIB_KIB - 200000,
        compressors=("lz4", "lzo", "lzo-rle"),
        zswap={**MODERN_ZSWAP, "enabled": "Y", "compressor": "lz4"},
        systemd=True,
    )
    t.cpus([[n] for n in range(8)], model="ARMv8 Processor rev 0 (v8l)", capacities=caps)
    t.disk(
        "mmcblk0",
        "179:0",
        rotational=False,
        parent=PLATFORM_MMC,
        partitions={"mmcblk0p1": "179:1", "mmcblk0p2": "179:2"},
    )
    t.mount("179:2", "/", "ext4", "/dev/mmcblk0p2")
    t.mount("179:1", "/boot", "vfat", "/dev/mmcblk0p1")
    t.finish()


def no_zswap_kernel(t: Tree) -> None:
    """A kernel built without zswap (no /sys/module/zswap); SSD swap partition; 8 GiB; 4 cores / 8
    threads numbered cpuN/cpuN+4; NUMA-less; swappiness 30 from some guide."""
    t.base(
        hostname="no-zswap",
        kernel="6.6.30-custom",
        mem_total_kib=8 * GIB_KIB - 200000,
        zswap=None,
        vm={**DEFAULT_VM, "swappiness": "30"},
    )
    t.cpus([[0, 4], [1, 5], [2, 6], [3, 7]], model="Intel(R) Core(TM) i7-8550U CPU @ 1.80GHz")
    t.disk("sda", "8:0", rotational=False, parent=PCI_SATA, partitions={"sda1": "8:1", "sda2": "8:2"})
    t.mount("8:1", "/", "ext4", "/dev/sda1")
    t.swap("/dev/sda2", "partition", 4194300, 0, -2)
    t.finish()


def old_zpool_kernel(t: Tree) -> None:
    """An older kernel (5.10) whose zswap has `zpool` and the same_filled parameters but no
    shrinker; two sockets / two NUMA nodes, 2 × 4 cores; an HDD swap partition and a swap file with a
    space in its name on an SSD mount; 16 GiB."""
    t.base(
        hostname="old-server",
        kernel="5.10.0-32-amd64",
        mem_total_kib=16 * GIB_KIB - 600000,
        compressors=("deflate", "lzo", "lzo-rle"),
        zswap={
            "enabled": "N",
            "compressor": "lzo",
            "max_pool_percent": "20",
            "zpool": "zbud",
            "accept_threshold_percent": "90",
            "same_filled_pages_enabled": "Y",
        },
        cgroup="v1",
    )
    t.cpus(
        [[n] for n in range(8)],
        model="Intel(R) Xeon(R) CPU E5-2609 v2 @ 2.50GHz",
        packages={n: n // 4 for n in range(8)},
        numa={0: [0, 1, 2, 3], 1: [4, 5, 6, 7]},
    )
    t.disk("sda", "8:0", rotational=True, parent=PCI_SATA, partitions={"sda1": "8:1", "sda2": "8:2"})
    t.disk("sdb", "8:16", rotational=False, parent=PCI_SATA2, partitions={"sdb1": "8:17"})
    t.mount("8:1", "/", "ext4", "/dev/sda1")
    t.mount("8:17", "/var/lib/models", "ext4", "/dev/sdb1")
    t.swap("/dev/sda2", "partition", 16777212, 1048576, -2)
    t.swap("/var/lib/models/swap\\040file", "file", 1048572, 0, -3)  # a space in the path
    t.finish()


def lxc_container(t: Tree) -> None:
    """Inside an LXC container on Proxmox: lxcfs shows the container's swap limit in /proc/swaps as
    "none … virtual" (not an area anyone can swapon/swapoff); root on an LVM thin volume over NVMe."""
    t.base(hostname="ct101", kernel="6.8.12-4-pve", mem_total_kib=8 * GIB_KIB, zswap=dict(MODERN_ZSWAP), systemd=True)
    t.cpus([[n] for n in range(4)], model="AMD EPYC 7302P 16-Core Processor")
    t.disk("nvme0n1", "259:0", rotational=False, parent=PCI_NVME, partitions={"nvme0n1p3": "259:3"})
    t.dm("dm-5", "253:5", dm_name="pve-vm--101--disk--0", slaves=["nvme0n1p3"])
    t.mount("253:5", "/", "ext4", "/dev/mapper/pve-vm--101--disk--0")
    t.swap("none", "virtual", 524288, 0, 0)
    t.finish()


TREES: dict[str, Callable[[Tree], None]] = {
    "smt-2c4t": smt_2c4t,
    "hybrid-2p8e": hybrid_2p8e,
    "nvme-hdd-swap": nvme_hdd_swap,
    "zram-active": zram_active,
    "no-swap-4g": no_swap_4g,
    "btrfs-swapfile": btrfs_swapfile,
    "dm-crypt-swap": dm_crypt_swap,
    "dm-crypt-swap-by-name": dm_crypt_swap_by_name,
    "arm-big-little": arm_big_little,
    "no-zswap-kernel": no_zswap_kernel,
    "old-zpool-kernel": old_zpool_kernel,
    "lxc-container": lxc_container,
}


def build_tree(name: str, root: Path) -> Path:
    """Write the tree `name` under `root` (created); returns `root`."""
    root.mkdir(parents=True, exist_ok=False)
    TREES[name](Tree(root))
    return root


_built: dict[str, Path] = {}


def built_trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every hand-made tree, built once per session: name → its root."""
    if not _built:
        base = tmp_path_factory.mktemp("trees")
        for name in TREES:
            _built[name] = build_tree(name, base / name)
    return _built

"""Read the facts of a host from its files, relative to a root directory (the live `/` or a snapshot).

Read-only. A file that is missing or unreadable makes its value None and adds a note; nothing here
raises for a strange machine except a root directory that does not exist at all.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

from autoglm_helper.contract import catalogue, procfs

from .errors import BadInput
from .facts import (
    DEVICE_CLASSES,
    FACTS_VERSION,
    CgroupFacts,
    Cpu,
    CpuFacts,
    Facts,
    MemoryFacts,
    Mount,
    Pressure,
    SwapArea,
    TunerFacts,
    UnitFacts,
    ZswapFacts,
)


class Reader:
    """Files under a root directory; every miss is remembered as a note."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.notes: list[str] = []

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def read(self, rel: str, *, quiet: bool = False) -> str | None:
        try:
            return self.path(rel).read_text(errors="replace")
        except OSError as exc:
            if not quiet:
                self.notes.append(f"/{rel.lstrip('/')}: {exc.strerror or exc}; treated as unknown")
            return None

    def exists(self, rel: str) -> bool:
        return os.path.lexists(self.path(rel))

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(rel)))
        except OSError:
            return []

    def resolve(self, rel: str) -> str | None:
        """Follow symlinks of a path under the root; the result relative to the root, or None."""
        real = os.path.realpath(self.path(rel))
        root = os.path.realpath(self.root)
        if not os.path.exists(real) or not (real == root or real.startswith(root.rstrip("/") + "/")):
            return None
        return "/" + os.path.relpath(real, root)


def parse_cpulist(text: str | None) -> list[int]:
    """ "0-3,8,10-11" → [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    for part in (text or "").strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return sorted(set(cpus))


# ---- CPU -----------------------------------------------------------------------------------


def read_cpu(r: Reader) -> CpuFacts:
    base = "sys/devices/system/cpu"
    online_text = r.read(f"{base}/online")
    if online_text is not None:
        online = parse_cpulist(online_text)
    else:
        online = sorted(int(d[3:]) for d in r.listdir(base) if re.fullmatch(r"cpu\d+", d))
    p_cores = set(parse_cpulist(r.read("sys/devices/cpu_core/cpus", quiet=True)))
    e_cores = set(parse_cpulist(r.read("sys/devices/cpu_atom/cpus", quiet=True)))
    hybrid = bool(p_cores and e_cores)
    capacities: dict[int, int | None] = {}
    for n in online:
        text = r.read(f"{base}/cpu{n}/cpu_capacity", quiet=True)
        capacities[n] = int(text) if text and text.strip().isdigit() else None
    known_caps = {c for c in capacities.values() if c is not None}
    big_little = len(known_caps) > 1
    cpus = []
    for n in online:
        topo = f"{base}/cpu{n}/topology"
        core = r.read(f"{topo}/core_cpus_list", quiet=True) or r.read(f"{topo}/thread_siblings_list", quiet=True)
        if core is None:
            r.notes.append(f"/{topo}: no core_cpus_list or thread_siblings_list; cpu{n} counted as its own core")
        package = r.read(f"{topo}/physical_package_id", quiet=True)
        capacity = capacities[n]
        if hybrid:
            kind = "performance" if n in p_cores else "efficiency" if n in e_cores else "standard"
        elif big_little and capacity is not None:
            # big and mid cores both count: phone SoCs ship 1×1024, 3×870, 4×250
            kind = "performance" if capacity * 2 >= max(known_caps) else "efficiency"
        else:
            kind = "standard"
        cpus.append(
            Cpu(
                id=n,
                core=",".join(map(str, parse_cpulist(core))) if core else str(n),
                package=int(package) if package and package.strip().lstrip("-").isdigit() else None,
                kind=kind,
                capacity=capacities[n],
            )
        )
    model = None
    for line in (r.read("proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model"):
            model = value.strip()
            break
    nodes = {
        d: parse_cpulist(r.read(f"sys/devices/system/node/{d}/cpulist", quiet=True))
        for d in r.listdir("sys/devices/system/node")
        if re.fullmatch(r"node\d+", d)
    }
    isolated = parse_cpulist(r.read(f"{base}/isolated", quiet=True))
    return CpuFacts(online=online, cpus=cpus, hybrid=hybrid, model=model, numa_nodes=nodes, isolated=isolated)


# ---- memory --------------------------------------------------------------------------------


def read_memory(r: Reader) -> MemoryFacts:
    info = procfs.parse_meminfo(r.read("proc/meminfo") or "")
    psi: dict[str, Pressure] = {}
    for line in (r.read("proc/pressure/memory", quiet=True) or "").splitlines():
        kind, *pairs = line.split()
        vals = dict(p.split("=", 1) for p in pairs if "=" in p)
        try:
            psi[kind] = Pressure(float(vals["avg10"]), float(vals["avg60"]), float(vals["avg300"]), int(vals["total"]))
        except (KeyError, ValueError):
            r.notes.append(f"/proc/pressure/memory: cannot read line {line!r}")
    if not psi:
        r.notes.append("/proc/pressure/memory: PSI not available; memory pressure unknown")
    return MemoryFacts(
        total_kib=info.get("MemTotal"),
        available_kib=info.get("MemAvailable"),
        zswap_kib=info.get("Zswap"),
        zswapped_kib=info.get("Zswapped"),
        psi_some=psi.get("some"),
        psi_full=psi.get("full"),
    )


# ---- block devices, mounts, swap -----------------------------------------------------------


def block_device(r: Reader, name: str, depth: int = 0) -> tuple[str | None, str]:
    """A block device name (partition, dm, disk) → (the whole disk's name, its class)."""
    node = r.resolve(f"sys/class/block/{name}")
    if node is None or depth > 8:
        return None, "unknown"
    disk_node = str(Path(node).parent) if r.exists(f"{node}/partition") else node
    disk = Path(disk_node).name
    if disk.startswith("zram"):
        return disk, "zram"
    if disk.startswith("nvme"):
        return disk, "nvme"
    if disk.startswith("mmcblk"):
        return disk, "mmc"
    if disk.startswith("loop"):  # as fast as the file behind it, which sysfs does not tell
        return disk, "unknown"
    slaves = r.listdir(f"{disk_node}/slaves")
    if slaves:  # dm-crypt, LVM, md: as fast as the slowest device underneath
        classes = [block_device(r, s, depth + 1)[1] for s in slaves]
        return disk, max(classes, key=DEVICE_CLASSES.index)
    rotational = r.read(f"{disk_node}/queue/rotational", quiet=True)
    if rotational is None:
        return disk, "unknown"
    return disk, "hdd" if rotational.strip() == "1" else "ssd"


def _device_of_dev_path(r: Reader, dev_path: str) -> tuple[str | None, str]:
    resolved = r.resolve(dev_path) if dev_path.startswith("/dev/") else None
    name = Path(resolved or dev_path).name
    if name.startswith("dm-") or r.exists(f"sys/class/block/{name}"):
        return block_device(r, name)
    for dm in r.listdir("sys/block"):  # /dev/mapper/NAME when /dev is not in the snapshot
        if (r.read(f"sys/block/{dm}/dm/name", quiet=True) or "").strip() == name:
            return block_device(r, dm)
    return None, "unknown"


_VIRTUAL_FS = {
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "tmpfs",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "tracefs",
    "configfs",
    "pstore",
    "bpf",
    "mqueue",
    "hugetlbfs",
    "fusectl",
    "autofs",
    "efivarfs",
    "binfmt_misc",
    "overlay",
    "squashfs",
    "nsfs",
    "ramfs",
    "rpc_pipefs",
    "fuse.portal",
}


def read_mounts(r: Reader) -> tuple[list[Mount], list[tuple[str, str, str]]]:
    """Block-backed mounts, and every (mount point, fstype, super options) line for cgroup detection."""
    mounts: list[Mount] = []
    all_lines: list[tuple[str, str, str]] = []
    text = r.read("proc/self/mountinfo")
    for line in (text or "").splitlines():
        left, sep, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if not sep or len(fields) < 5 or len(rest) < 2:
            continue
        majmin, mount_point = fields[2], procfs.unescape(fields[4])
        fstype, source = rest[0], procfs.unescape(rest[1])
        all_lines.append((mount_point, fstype, rest[2] if len(rest) > 2 else ""))
        if fstype in _VIRTUAL_FS:
            continue
        major = majmin.split(":")[0]
        if major != "0" and r.exists(f"sys/dev/block/{majmin}"):
            resolved = r.resolve(f"sys/dev/block/{majmin}")
            device, cls = block_device(r, Path(resolved).name) if resolved else (None, "unknown")
        elif source.startswith("/dev/"):  # btrfs and friends report an anonymous st_dev (major 0)
            device, cls = _device_of_dev_path(r, source)
        else:
            continue
        mounts.append(
            Mount(
                mount_point=mount_point,
                fstype=fstype,
                source=source,
                device=device,
                device_class=cls,
                free_mib=_free_mib(r, mount_point),
            )
        )
    return mounts, all_lines


def _free_mib(r: Reader, mount_point: str) -> int | None:
    if os.path.realpath(r.root) != "/":
        return None  # statvfs under a snapshot would describe the host, not the snapshot's machine
    try:
        st = os.statvfs(mount_point)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize // (1024 * 1024)


def mount_for(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount holding `path`: the longest mount point that contains it (works where st_dev lies)."""
    best: Mount | None = None
    for m in mounts:
        mp = m.mount_point.rstrip("/") or "/"
        inside = mp == "/" or path == mp or path.startswith(mp + "/")
        if inside and (best is None or len(mp) >= len(best.mount_point.rstrip("/") or "/")):
            best = m
    return best


def read_swaps(r: Reader, mounts: list[Mount]) -> list[SwapArea]:
    areas = []
    for row in procfs.parse_swaps(r.read("proc/swaps") or ""):
        area, kind, path = row.shown, row.type, row.path
        if kind not in ("partition", "file"):  # lxcfs shows a container's swap limit as "none virtual"
            r.notes.append(f"swap area {area}: type {kind!r} is neither a partition nor a file; left out")
            continue
        if kind == "partition":
            device, cls = _device_of_dev_path(r, path)
        else:
            mount = mount_for(path, mounts)
            device, cls = (mount.device, mount.device_class) if mount else (None, "unknown")
        if cls == "unknown":
            r.notes.append(f"swap area {area}: device class unknown")
        areas.append(
            SwapArea(
                area=area,
                type=kind,
                size_kib=row.size_kib,
                used_kib=row.used_kib,
                priority=row.priority,
                device=device,
                device_class=cls,
            )
        )
    return areas


# ---- kernel knobs --------------------------------------------------------------------------


def read_zswap(r: Reader) -> ZswapFacts:
    params = r.listdir("sys/module/zswap/parameters")
    if not params:
        r.notes.append("/sys/module/zswap/parameters: absent; this kernel has no zswap")
    compressors: set[str] = set()
    name = None
    for line in (r.read("proc/crypto") or "").splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if key == "name":
            name = value
        elif key == "type" and value in catalogue.COMPRESSION_CRYPTO_TYPES and name:
            compressors.add(name)
    _note_unloaded_compressors(r, params, compressors)
    return ZswapFacts(present=bool(params), parameters=params, compressors_available=sorted(compressors))


def _note_unloaded_compressors(r: Reader, params: list[str], loaded: set[str]) -> None:
    """Debian's and Ubuntu's kernels build lz4 and zstd as modules: absent from /proc/crypto until loaded, so
    neither the plan nor the helper may count on them (the helper's sandbox cannot see the modules)."""
    release = (r.read("proc/sys/kernel/osrelease", quiet=True) or "").strip()
    if not params or not release:
        return
    modules = {name.split(".ko")[0] for name in r.listdir(f"lib/modules/{release}/kernel/crypto") if ".ko" in name}
    unloaded = sorted((modules & set(catalogue.ZSWAP_COMPRESSORS)) - loaded)
    if unloaded:
        r.notes.append(f"zswap compressors {', '.join(unloaded)}: kernel modules not loaded, so not usable yet; "
                       f"'sudo modprobe {unloaded[-1]}' loads one now, a line in /etc/modules-load.d/ at every boot")


def read_knobs(r: Reader) -> dict[str, str]:
    knobs = {}
    for knob in catalogue.SCALAR_KNOBS.values():
        # zswap may be built out; kernel.task_delayacct exists since 5.14: their absence is no news
        text = r.read(knob.path, quiet=knob.name.startswith("zswap.") or knob.name == "kernel.task_delayacct")
        if text is not None:
            knobs[knob.name] = text.strip()
    return knobs


def read_thp(r: Reader) -> dict[str, str]:
    thp = {}
    for key in ("enabled", "defrag"):
        text = r.read(f"sys/kernel/mm/transparent_hugepage/{key}", quiet=True) or ""
        m = re.search(r"\[([^\]]+)\]", text)
        if m:
            thp[key] = m.group(1)
    return thp


def read_cgroup(r: Reader, mount_lines: list[tuple[str, str, str]]) -> CgroupFacts:
    v2_points = [mp for mp, fstype, _ in mount_lines if fstype == "cgroup2"]
    v1_memory = any(fstype == "cgroup" and "memory" in opts.split(",") for _, fstype, opts in mount_lines)
    v1_any = any(fstype == "cgroup" for _, fstype, _ in mount_lines)
    if "/sys/fs/cgroup" in v2_points and not v1_any:
        layout = "v2"
    elif v2_points and v1_any:
        layout = "hybrid"
    elif v1_any:
        layout = "v1"
    else:
        layout = "unknown"
        r.notes.append("cgroup layout unknown: no cgroup mounts in /proc/self/mountinfo")
    memory: str | None = "v1" if v1_memory else None
    if memory is None:
        for mp in v2_points:
            if "memory" in (r.read(f"{mp}/cgroup.controllers", quiet=True) or "").split():
                memory = "v2"
    return CgroupFacts(layout=layout, memory_controller=memory)


# ---- systemd units and co-resident tuners (live over D-Bus when systemd runs, else from files) ----

_UNIT_DIRS = ("etc/systemd/system", "run/systemd/system", "usr/lib/systemd/system", "lib/systemd/system")
_UNIT_FILE = re.compile(r"[A-Za-z0-9:_.\\-]+\.(service|socket|timer|path)")


def read_units(r: Reader) -> list[UnitFacts]:
    """Unit-file states as `systemctl is-enabled` would report them, read from the files alone."""
    files: dict[str, str] = {}
    masked: dict[str, str] = {}
    for d in _UNIT_DIRS:
        inside = r.resolve(d) is not None  # the directory, once: a plain file in it is then inside the root too
        for name in r.listdir(d):
            if not _UNIT_FILE.fullmatch(name):
                continue
            rel = f"{d}/{name}"
            if not os.path.islink(r.path(rel)):
                if inside and name not in files:
                    files[name] = rel
            elif os.readlink(r.path(rel)) == "/dev/null":
                masked.setdefault(name, "masked-runtime" if d.startswith("run") else "masked")
            elif name not in files and r.resolve(rel):  # a link: followed, and kept only inside the root
                files[name] = rel
    wanted: dict[str, str] = {}
    for d in _UNIT_DIRS[:2]:
        for sub in r.listdir(d):
            if sub.endswith((".wants", ".requires")):
                for name in r.listdir(f"{d}/{sub}"):
                    wanted.setdefault(name, "enabled-runtime" if d.startswith("run") else "enabled")
    units = []
    for name in sorted(set(files) | set(masked)):
        if name in masked:
            state = masked[name]
        elif name in wanted:
            state = wanted[name]
        else:
            text = r.read(files[name], quiet=True) or ""
            install = re.search(r"^\[Install\]([^\[]*)", text, re.M)
            has_install = bool(
                install and re.search(r"^\s*(WantedBy|RequiredBy|Alias|Also)\s*=", install.group(1), re.M)
            )
            state = "disabled" if has_install else "static"
        units.append(UnitFacts(name=name, state=state, active=None, source="files"))
    return units


def read_units_live(timeout: float = 5.0) -> list[UnitFacts]:
    """Unit-file states (ListUnitFiles) and ActiveState (ListUnits) from the running systemd on the system
    bus — both readable unprivileged. Raises OSError when the bus or systemd does not answer.
    dbus-fast is imported here, so `diff` on a machine without systemd starts without it."""
    import asyncio

    from dbus_fast import BusType, Message, MessageType
    from dbus_fast.aio import MessageBus
    from dbus_fast.errors import DBusFastError

    async def call(bus: MessageBus, member: str) -> list[Any]:
        reply = await bus.call(Message(destination="org.freedesktop.systemd1", path="/org/freedesktop/systemd1",
                                       interface="org.freedesktop.systemd1.Manager", member=member))
        if reply.message_type == MessageType.ERROR:
            raise OSError(f"systemd {member}: {reply.error_name}")
        return reply.body[0]

    async def run() -> list[UnitFacts]:
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        try:
            files = await call(bus, "ListUnitFiles")
            active = {row[0]: row[3] for row in await call(bus, "ListUnits")}
        finally:
            bus.disconnect()
        units = {}
        for path, state in files:
            name = os.path.basename(path)
            loaded = os.path.basename(os.path.realpath(path)) if state == "alias" else name  # ListUnits: real names
            if _UNIT_FILE.fullmatch(name):
                units[name] = UnitFacts(name=name, state=state, active=active.get(loaded, "inactive"), source="systemd")
        return [units[name] for name in sorted(units)]

    async def bounded() -> list[UnitFacts]:
        return await asyncio.wait_for(run(), timeout)

    try:
        return asyncio.run(bounded())
    except (DBusFastError, EOFError) as exc:  # a refused, unauthenticated or broken connection
        raise OSError(str(exc)) from None


def tuner_unit(name: str) -> str | None:
    """The unit of a co-resident tuner from read_tuners (None: it has none, e.g. zram-generator)."""
    return next((unit for tuner, _paths, unit, _conflicts in _TUNERS if tuner == name), None)


# (name, files that show it is installed, its unit, what it competes with us on)
_TUNERS: tuple[tuple[str, tuple[str, ...], str | None, tuple[str, ...]], ...] = (
    (
        "tuned",
        ("usr/sbin/tuned", "etc/tuned/active_profile"),
        "tuned.service",
        ("vm sysctls", "transparent hugepages", "CPU governor"),
    ),
    (
        "power-profiles-daemon",
        ("usr/libexec/power-profiles-daemon", "usr/lib/power-profiles-daemon"),
        "power-profiles-daemon.service",
        ("CPU governor and energy preference",),
    ),
    ("tlp", ("usr/sbin/tlp", "etc/tlp.conf"), "tlp.service", ("CPU governor", "disk power settings")),
    (
        "zram-generator",
        ("usr/lib/systemd/system-generators/zram-generator", "lib/systemd/system-generators/zram-generator"),
        None,
        ("swap areas (a zram device at priority 100)", "zswap (zram and zswap should not be stacked)"),
    ),
    ("earlyoom", ("usr/bin/earlyoom", "etc/default/earlyoom"), "earlyoom.service", ("OOM victim choice",)),
    (
        "systemd-oomd",
        ("usr/lib/systemd/systemd-oomd", "lib/systemd/systemd-oomd"),
        "systemd-oomd.service",
        ("OOM victim choice", "memory pressure kills"),
    ),
    (
        "ananicy",
        ("usr/bin/ananicy-cpp", "usr/bin/ananicy", "etc/ananicy.d"),
        "ananicy-cpp.service",
        ("process nice and I/O priority",),
    ),
)


def read_tuners(r: Reader, units: list[UnitFacts]) -> list[TunerFacts]:
    states = {u.name: u.state for u in units}
    found = []
    for name, evidence_paths, unit, conflicts in _TUNERS:
        evidence = next((p for p in evidence_paths if r.exists(p)), None)
        if evidence is None:
            continue
        enabled = None
        if unit and unit in states:
            enabled = states[unit].startswith(("enabled", "static", "indirect"))
        found.append(TunerFacts(name=name, evidence="/" + evidence, enabled=enabled, conflicts_on=list(conflicts)))
    return found


def read_container(r: Reader, swaps_text: str | None) -> str | None:
    """Kernel-wide knobs belong to the host when we run inside a container."""
    marker = r.read("run/systemd/container", quiet=True)  # written by systemd-nspawn, lxc, podman, docker+systemd
    if marker and marker.strip():
        return marker.strip()
    if r.exists("run/.containerenv"):  # podman writes it at run time (/.dockerenv also survives in images: not used)
        return "podman"
    if r.exists("proc/vz") and not r.exists("proc/bc"):
        return "openvz"
    if any(len(line.split()) > 1 and line.split()[1] == "virtual" for line in (swaps_text or "").splitlines()):
        return "lxc"  # lxcfs presents the container's swap limit as a "virtual" area
    return None


# ---- all together --------------------------------------------------------------------------


def read_own_swap_files(r: Reader) -> dict[str, int]:
    """Our swap files at the allowed paths, active or not (a folder the caller may not read hides its file)."""
    found = {}
    for directory in catalogue.SWAP_FILE_DIRS:
        path = f"{directory}/{catalogue.SWAP_FILE_NAME}"
        try:
            st = os.lstat(r.path(path.lstrip("/")))
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            found[path] = st.st_size // (1024 * 1024)
    return found


def collect_facts(root: Path | str = "/") -> Facts:
    """Read every fact the planner uses from the tree at `root`."""
    root = Path(root)
    if not root.is_dir():
        raise BadInput(f"--sysroot {root}: not a directory; expected a tree laid out like / (a snapshot's root/)")
    r = Reader(root)
    if not r.exists("proc") and not r.exists("sys"):
        raise BadInput(f"--sysroot {root}: has neither proc/ nor sys/; expected a tree laid out like /")
    mounts, mount_lines = read_mounts(r)
    systemd_running = r.exists("run/systemd/system")
    units = None
    if systemd_running and root == Path("/"):
        try:
            units = read_units_live()
        except (OSError, TimeoutError) as exc:
            r.notes.append(f"unit states read from files: systemd did not answer on the system bus ({exc})")
    if units is None:
        units = read_units(r)
    hostname = r.read("proc/sys/kernel/hostname", quiet=True) or r.read("etc/hostname", quiet=True)
    kernel = r.read("proc/sys/kernel/osrelease", quiet=True)
    if kernel is None:
        version = r.read("proc/version", quiet=True)
        kernel = version.split()[2] if version and len(version.split()) > 2 else None
    return Facts(
        version=FACTS_VERSION,
        hostname=hostname.strip() if hostname else None,
        kernel=kernel.strip() if kernel else None,
        cpu=read_cpu(r),
        memory=read_memory(r),
        swaps=read_swaps(r, mounts),
        mounts=mounts,
        zswap=read_zswap(r),
        knobs=read_knobs(r),
        thp=read_thp(r),
        cgroup=read_cgroup(r, mount_lines),
        systemd_running=systemd_running,
        container=read_container(r, r.read("proc/swaps", quiet=True)),
        units=units,
        tuners=read_tuners(r, units),
        notes=r.notes,
        swap_files=read_own_swap_files(r),
    )

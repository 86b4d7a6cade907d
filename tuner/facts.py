"""Facts: what the tool knows about one host, as plain data.

Built by `collect.collect_facts` from a live machine or a snapshot tree, or loaded from the JSON of
`autoglm-tune facts --json` taken on another host. Unknown values are None, with a note saying why.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import BadInput

FACTS_VERSION = 1

# Device classes, fastest first. Swap priorities and swap file placement follow this order.
DEVICE_CLASSES = ("zram", "nvme", "ssd", "mmc", "hdd", "unknown")


@dataclass(frozen=True)
class Cpu:
    id: int
    core: str  # the core's sibling list ("0,2"): CPUs with equal `core` share one physical core
    package: int | None
    kind: str  # "performance", "efficiency" (hybrid E-core or low capacity) or "standard"
    capacity: int | None  # /sys/.../cpu_capacity (ARM big.LITTLE; 1024 = biggest)


@dataclass(frozen=True)
class CpuFacts:
    online: list[int]
    cpus: list[Cpu]
    hybrid: bool
    model: str | None
    numa_nodes: dict[str, list[int]]
    isolated: list[int]


@dataclass(frozen=True)
class Pressure:
    avg10: float
    avg60: float
    avg300: float
    total_us: int


@dataclass(frozen=True)
class MemoryFacts:
    total_kib: int | None
    available_kib: int | None
    zswap_kib: int | None
    zswapped_kib: int | None
    psi_some: Pressure | None
    psi_full: Pressure | None


@dataclass(frozen=True)
class SwapArea:
    area: str  # the path as /proc/swaps shows it (spaces as \040)
    type: str  # "partition" or "file"
    size_kib: int
    used_kib: int
    priority: int
    device: str | None  # the block device behind it, e.g. "nvme0n1"
    device_class: str  # one of DEVICE_CLASSES


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    source: str
    device: str | None
    device_class: str
    free_mib: int | None  # only read on the live root; None in snapshots


@dataclass(frozen=True)
class ZswapFacts:
    present: bool
    parameters: list[str]  # the parameters this kernel has (never assume zpool)
    compressors_available: list[str]


@dataclass(frozen=True)
class CgroupFacts:
    layout: str  # "v2", "hybrid", "v1" or "unknown"
    memory_controller: str | None  # "v1", "v2" or None


@dataclass(frozen=True)
class UnitFacts:
    name: str
    state: str  # enabled, disabled, static, masked, … as systemctl is-enabled says
    active: str | None  # active/inactive when read from a running systemd; None from files
    source: str  # "files" (unit files under the root) or "systemd" (live, over D-Bus)


@dataclass(frozen=True)
class TunerFacts:
    name: str
    evidence: str  # the file that shows it is installed
    enabled: bool | None
    conflicts_on: list[str]


@dataclass(frozen=True)
class CalibrationFacts:
    """The policy's [calibration] as `facts --json` reports it on the host measured (not read from a snapshot):
    what calibrate chose, on what, and whether it still describes this machine and model."""

    source: str  # the drop-in
    date: str
    host: str
    model_path: str
    model_bytes: int
    model_mtime_ns: int
    topology: str
    cpus: list[int]
    threads: int
    nice: int | None
    reason: str
    nice_reason: str | None
    stale: bool
    stale_because: str | None


@dataclass(frozen=True)
class Facts:
    version: int
    hostname: str | None
    kernel: str | None
    cpu: CpuFacts
    memory: MemoryFacts
    swaps: list[SwapArea]
    mounts: list[Mount]
    zswap: ZswapFacts
    knobs: dict[str, str]  # catalogue knob → the exact text read from the kernel
    thp: dict[str, str]  # "enabled"/"defrag" → the selected mode
    cgroup: CgroupFacts
    systemd_running: bool
    container: str | None  # "lxc", "docker", "podman", … when the tool runs inside a container
    units: list[UnitFacts]
    tuners: list[TunerFacts]
    notes: list[str] = field(default_factory=list)
    # autoglm-tune's own swap files at the allowed paths (path → MiB), active or not: after a reboot the file of
    # an earlier apply is still there, inactive, and its size must not be recomputed from the space it takes
    swap_files: dict[str, int] = field(default_factory=dict)
    calibration: CalibrationFacts | None = None  # only from `facts` on the live machine (cli.py)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


@functools.cache
def _fields(tp: type) -> tuple[frozenset[str], tuple[tuple[str, Any, bool], ...]]:
    """A dataclass's field names and (name, resolved type, has a default) per field: resolving the string
    annotations is the costly part of decoding, and it is the same for every host."""
    hints = typing.get_type_hints(tp)
    fields = dataclasses.fields(tp)
    return frozenset(f.name for f in fields), tuple(
        (f.name, hints[f.name], f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)
        for f in fields
    )


def _decode(tp: Any, value: Any, where: str) -> Any:
    """Rebuild a typed value from JSON data, refusing anything of the wrong shape."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _decode(inner, value, where)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise BadInput(f"{where}: expected an object")
        names, fields = _fields(tp)
        unknown = sorted(set(value) - names)
        if unknown:
            raise BadInput(f"{where}.{unknown[0]}: unknown field; allowed: {', '.join(sorted(names))}")
        kwargs = {}
        for name, hint, has_default in fields:
            if name not in value:
                if has_default:
                    continue
                raise BadInput(f"{where}.{name}: missing")
            kwargs[name] = _decode(hint, value[name], f"{where}.{name}")
        return tp(**kwargs)
    if origin is list:
        if not isinstance(value, list):
            raise BadInput(f"{where}: expected a list")
        (inner,) = typing.get_args(tp)
        return [_decode(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise BadInput(f"{where}: expected an object")
        _, inner = typing.get_args(tp)
        return {str(k): _decode(inner, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise BadInput(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def facts_from_json(text: str, source: str) -> Facts:
    """Load facts written by `facts --json`; BadInput naming the file and field on any mismatch."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BadInput(
            f"{source}: not valid JSON ({exc}); expected the output of 'autoglm-tune facts --json'"
        ) from None
    if not isinstance(data, dict) or data.get("version") != FACTS_VERSION:
        got = data.get("version") if isinstance(data, dict) else None
        raise BadInput(f"{source}: facts version {got!r} is not supported; allowed: {FACTS_VERSION}")
    try:
        return _decode(Facts, data, "facts")
    except BadInput as exc:
        raise BadInput(f"{source}: {exc}") from None

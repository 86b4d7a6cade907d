"""The knob catalogue: the single definition of what autoglm-tune may change, and to which values.

The root helper decides every write with this module alone; the planner imports it so that the
plan, the policy ranges and the helper can never disagree. Standard library only: the helper
must stay auditable and must not import the tuner.

Values are typed (int, bool, str); `Knob.parse` turns the kernel's text into that type and
`Knob.render` turns it back into the text the kernel expects.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Value = int | bool | str
Kind = Literal["int", "bool", "word"]
Persistence = Literal["runtime", "persistent"]


ECHO_CHARS = 200  # the most of a caller's value an error message repeats (and so the audit log keeps)


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """`text`, or its first `limit` characters with an ellipsis and the original length."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


def _show(value: object) -> str:
    """A value as JSON/TOML write it (true, "x", 3), clipped, for error messages."""
    try:
        return clip(json.dumps(value))
    except (TypeError, ValueError):
        return clip(repr(value))


class CatalogueError(ValueError):
    """A value the catalogue refuses; `field` names what was wrong, `allowed` what would be accepted."""

    def __init__(self, field: str, problem: str, allowed: str) -> None:
        super().__init__(f"{field}: {problem}; allowed: {allowed}")
        self.field = field
        self.problem = problem
        self.allowed = allowed


@dataclass(frozen=True)
class Knob:
    """One scalar kernel setting: where it lives and what values it may take."""

    name: str
    path: str  # relative to the root directory, e.g. "proc/sys/vm/swappiness"
    kind: Kind
    minimum: int | None = None
    maximum: int | None = None
    persistence: Persistence = "runtime"
    doc: str = ""

    @property
    def allowed(self) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.kind == "word":
            return "a name of lowercase letters, digits and dashes"
        return f"an integer {self.minimum}–{self.maximum}"

    def parse(self, raw: str) -> Value:
        """Kernel text → typed value. Raises CatalogueError when the text is not of this knob's kind."""
        text = raw.strip()
        if self.kind == "bool":
            if text in ("Y", "1"):
                return True
            if text in ("N", "0"):
                return False
        elif self.kind == "int":
            try:
                return int(text)
            except ValueError:
                pass
        elif _WORD.fullmatch(text):
            return text
        raise CatalogueError(self.name, f"the kernel reports {text!r}", self.allowed)

    def render(self, value: Value) -> str:
        """Typed value → the text written to the kernel."""
        if self.kind == "bool":
            return "Y" if value else "N"
        return str(value)

    def check(self, value: object) -> Value:
        """Validate a target value arriving from a policy or a plan; returns it unchanged."""
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            raise CatalogueError(self.name, f"{_show(value)} is not a boolean", self.allowed)
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise CatalogueError(self.name, f"{_show(value)} is not an integer", self.allowed)
            assert self.minimum is not None and self.maximum is not None
            if not self.minimum <= value <= self.maximum:
                raise CatalogueError(self.name, f"{value} is out of range", self.allowed)
            return value
        if isinstance(value, str) and _WORD.fullmatch(value):
            return value
        raise CatalogueError(self.name, f"{_show(value)} is not a valid name", self.allowed)


_WORD = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")


def _sysctl(name: str, minimum: int, maximum: int, doc: str) -> Knob:
    return Knob(
        name=f"vm.{name}",
        path=f"proc/sys/vm/{name}",
        kind="int",
        minimum=minimum,
        maximum=maximum,
        doc=doc,
    )


def _zswap(name: str, kind: Kind, minimum: int | None = None, maximum: int | None = None, doc: str = "") -> Knob:
    return Knob(
        name=f"zswap.{name}",
        path=f"sys/module/zswap/parameters/{name}",
        kind=kind,
        minimum=minimum,
        maximum=maximum,
        doc=doc,
    )


# Ranges: Documentation/admin-guide/sysctl/vm.rst; the zswap percents are checked here because the
# kernel accepts 0 and 101 silently (seen on the CI kernel 6.18).
SCALAR_KNOBS: dict[str, Knob] = {
    k.name: k
    for k in (
        _sysctl("swappiness", 0, 200, "relative IO cost of swap vs file paging"),
        _sysctl("vfs_cache_pressure", 1, 1000, "dentry/inode reclaim vs page cache"),
        _sysctl("page-cluster", 0, 10, "log2 of pages read ahead on swap-in"),
        _sysctl("watermark_scale_factor", 1, 3000, "kswapd aggressiveness in 1/10000 of memory"),
        _sysctl("watermark_boost_factor", 0, 100000, "extra reclaim after fragmentation events"),
        _sysctl("compaction_proactiveness", 0, 100, "background compaction effort"),
        _zswap("enabled", "bool", doc="compressed cache in front of swap"),
        _zswap("compressor", "word", doc="must be listed in /proc/crypto"),
        _zswap("max_pool_percent", "int", 1, 100, "pool limit, percent of total RAM"),
        _zswap("accept_threshold_percent", "int", 1, 100, "refill hysteresis, percent of the pool"),
        _zswap("shrinker_enabled", "bool", doc="write cold entries back to disk under pressure"),
        # an int, not a bool: the sysctl takes 0/1, not Y/N
        Knob("kernel.task_delayacct", "proc/sys/kernel/task_delayacct", "int", 0, 1,
             doc="per-task delay accounting (block I/O in /proc/PID/stat); off by default since 5.14"),
    )
}

# Swap areas: priority through swapoff + swapon(SWAP_FLAG_PREFER | prio); kernel range 0..32767.
SWAP_PRIORITY = Knob(name="swap.priority", path="proc/swaps", kind="int", minimum=0, maximum=32767)
# A swap file the helper creates: size in MiB, only at SWAP_FILE_NAME inside an allowed directory.
SWAP_FILE_SIZE = Knob(
    name="swap.file", path="proc/swaps", kind="int", minimum=64, maximum=262144, persistence="persistent"
)
SWAP_FILE_DIRS: tuple[str, ...] = ("/var/lib/autoglm-tune/swap", "/var/swap", "/swap")
SWAP_FILE_NAME = "autoglm-tune.swap"

COMPRESSION_CRYPTO_TYPES = ("compression", "scomp", "acomp")
# The kernel's compression algorithms zswap can use (crypto/*.c); a kernel may build some as modules.
ZSWAP_COMPRESSORS = ("842", "deflate", "lz4", "lz4hc", "lzo", "lzo-rle", "zstd")


def check_swap_file_path(path: object) -> str:
    """A swap file may only be SWAP_FILE_NAME directly inside one of SWAP_FILE_DIRS."""
    allowed = " or ".join(f"{d}/{SWAP_FILE_NAME}" for d in SWAP_FILE_DIRS)
    if not isinstance(path, str) or path not in {f"{d}/{SWAP_FILE_NAME}" for d in SWAP_FILE_DIRS}:
        raise CatalogueError("swap.file path", f"{_show(path)} is not an allowed swap file", allowed)
    return path


# ---- systemd units -------------------------------------------------------------------------

UNIT_TARGET_STATES = ("disabled", "masked")
UNIT_SUFFIXES = ("service", "socket", "timer", "path", "mount", "automount", "swap", "target")
_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?\.(" + "|".join(UNIT_SUFFIXES) + ")")

# Units that are never stopped, disabled or masked, whatever a policy or a plan says. The helper checks every name
# systemd would act on, not only the name sent: the unit's id, its aliases (Names, and the alias symlinks in the
# unit search path) and every unit a stop in mode "replace" takes down with it (units.py).
NEVER_TOUCH_UNITS: tuple[str, ...] = (
    "ssh.*",
    "ssh@*",
    "sshd.*",
    "sshd@*",
    "openssh*",
    "dbus.*",
    "dbus-*",
    "dbus@*",
    "systemd-*",
    "procps.service",  # Debian's alias of systemd-sysctl.service
    "kmod.service",  # Debian's alias of systemd-modules-load.service
    "networking.service",
    "network*.service",
    "ifup@*",
    "ifupdown*",
    "NetworkManager*",
    "wpa_supplicant*",
    "iwd.service",
    "nftables.service",
    "ufw.service",
    "firewalld.service",
    "iptables.service",
    "ip6tables.service",
    "netfilter-persistent.service",
    "apparmor.service",
    "auditd.service",
    "audit-rules.service",
    "display-manager.service",
    "gdm*.service",
    "lightdm.service",
    "sddm.service",
    "polkit.service",
    "autoglm-tune*",
    "getty*",
    "autovt@*",
    "serial-getty@*",
    "container-getty@*",
    "console-getty.service",
    "user@*",
    "user-runtime-dir@*",
    "*.target",
)
# The kinds of unit that may be changed at all (an allowlist: mounts, swaps, automounts, targets, slices, scopes and
# devices are never stopped, disabled or masked), and only plain units: an instance of a template (getty@tty1,
# ssh@<connection>, user@<uid>, ifup@<interface>, container-getty@…) is a login, a session or a device of someone
# else's, so no instance is ever changed, whichever template it comes from.
CHANGEABLE_UNIT_KINDS = ("service", "socket", "timer", "path")


def check_unit_name(name: object) -> str:
    """A full unit name with a known suffix; templates only with an instance; no paths."""
    allowed = "a unit name such as cups.service (" + ", ".join(UNIT_SUFFIXES) + "); templates need an instance"
    if not isinstance(name, str) or "/" in name or not _UNIT_NAME.fullmatch(name) or len(name) > 255:
        raise CatalogueError("unit", f"{_show(name)} is not a unit name", allowed)
    if "@." in name:
        raise CatalogueError("unit", f"{_show(name)} is a template without an instance", allowed)
    return name


def never_touch_rule(name: str, extra_patterns: tuple[str, ...] = ()) -> str | None:
    """The rule that keeps the unit `name` from being changed (a never-touch pattern, or the allowlist of kinds),
    or None when it may be changed."""
    if name.rpartition(".")[2] not in CHANGEABLE_UNIT_KINDS:
        return "only " + ", ".join("." + k for k in CHANGEABLE_UNIT_KINDS) + " units may be changed"
    if "@" in name:
        return "no instance of a template is changed"
    return next((f"matches {p}" for p in (*NEVER_TOUCH_UNITS, *extra_patterns) if fnmatch.fnmatchcase(name, p)),
                None)


def is_never_touch(name: str, extra_patterns: tuple[str, ...] = ()) -> bool:
    return never_touch_rule(name, extra_patterns) is not None


NEVER_TOUCH_ALLOWED = ("a plain " + "/".join(CHANGEABLE_UNIT_KINDS) + " unit whose names and the units stopped with "
                       "it match none of " + " ".join(NEVER_TOUCH_UNITS))


def check_unit_closure(unit: str, related: Iterable[tuple[str, str]], where: str) -> None:
    """Refuse `unit` when any name systemd would act on for it is never-touch. `related` yields (name, why) pairs:
    the unit's own names, its aliases and the units stopped with it, each with a phrase saying how it is reached
    (e.g. ("networking.service", "networking.service Requires ifupdown-pre.service")); the unit itself is checked
    first. Raises CatalogueError on `{where}.unit`, naming the name, how it was reached and the rule it hit."""
    rule = never_touch_rule(unit)
    if rule is not None:
        raise CatalogueError(f"{where}.unit", f"{unit} is on the never-touch list ({rule})", NEVER_TOUCH_ALLOWED)
    for name, why in related:
        rule = never_touch_rule(name)
        if rule is not None:
            raise CatalogueError(f"{where}.unit", f"{unit} reaches {name} ({why}), which is on the never-touch list "
                                 f"({rule})", NEVER_TOUCH_ALLOWED)


# ---- the inference process -----------------------------------------------------------------

SCHED_POLICIES = ("other", "batch", "idle")
SCHED_NUMBERS = {"other": 0, "batch": 3, "idle": 5}  # SCHED_OTHER, SCHED_BATCH, SCHED_IDLE (sched.h)
IO_CLASSES = ("none", "realtime", "best-effort", "idle")
IO_CLASS_NUMBERS = {name: number for number, name in enumerate(IO_CLASSES)}  # IOPRIO_CLASS_* (ioprio.h)
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # an environment variable name the model may be given
NICE_RANGE = (-20, 19)
IO_PRIORITY_RANGE = (0, 7)
OOM_SCORE_ADJ_RANGE = (-1000, 1000)
# What the helper grants a caller for the caller's own model process (SetProcess, StartModel). Narrower
# than the kernel's: below nice -10 sit audio and system daemons; oom_score_adj -1000 makes a process
# unkillable, so the floor leaves the OOM killer a last resort.
MODEL_NICE_RANGE = (-10, 19)
MODEL_OOM_SCORE_ADJ_RANGE = (-900, 1000)
MODEL_MEMORY_SHARE_MAX = 0.75  # MemoryLow= and LimitMEMLOCK=: a quarter of RAM stays reclaimable for the rest
MODEL_UNIT_PREFIX = "autoglm-model-"  # transient model units: autoglm-model-<uid>-<port>.service
# CFS's weight of each nice value, -20 to 19 (kernel/sched/core.c, sched_prio_to_weight; nice 0 is 1024).
NICE_WEIGHTS = (88761, 71755, 56483, 46273, 36291, 29154, 23254, 18705, 14949, 11916,
                9548, 7620, 6100, 4904, 3906, 3121, 2501, 1991, 1586, 1277,
                1024, 820, 655, 526, 423, 335, 272, 215, 172, 137,
                110, 87, 70, 56, 45, 36, 29, 23, 18, 15)


def cpu_weight(nice: int) -> int:
    """The model unit's CPUWeight= for its nice: the share nice gives it against nice-0 tasks, on systemd's scale
    (100 is every unit's default, 1-10000). Nice weighs only inside one cgroup, and with sched_autogroup_enabled
    only inside one session, so against the user's sessions and services, cgroups of their own, the unit's nice
    alone counts for nothing; the weight carries it across."""
    return max(1, min(10000, round(100 * NICE_WEIGHTS[nice - NICE_RANGE[0]] / NICE_WEIGHTS[-NICE_RANGE[0]])))

KNOB_NAMES: tuple[str, ...] = (*SCALAR_KNOBS, SWAP_PRIORITY.name, SWAP_FILE_SIZE.name, "unit")

"""The policy schema (the one definition of every policy key), and loading with its resolution order:
the embedded default, /etc/autoglm-tune/policy.toml, /etc/autoglm-tune/policy.d/*.toml and *.json (in name order),
then --policy. A file is TOML, or JSON when its name ends in .json: one schema, two encodings.

Every bad value becomes a BadInput naming the file, the key and the allowed values.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoglm_helper.contract import catalogue
from autoglm_helper.contract.catalogue import CatalogueError

from .errors import BadInput
from .facts import DEVICE_CLASSES
from .presets import preset_names

AUTO = "auto"
KEEP = "keep"
DEFAULT_ETC = "/etc/autoglm-tune"
MAX_POLICY_BYTES = 1 << 20  # a policy is a few KiB; a file larger than this is not one
POLICY_SUFFIXES = (".toml", ".json")  # the two encodings of the one schema, for policy.d/ and --policy


class _Invalid(Exception):
    def __init__(self, problem: str, allowed: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.allowed = allowed


Parser = Callable[[Any], Any]


def _knob_value(knob_name: str, words: tuple[str, ...]) -> tuple[Parser, str]:
    knob = catalogue.SCALAR_KNOBS[knob_name]
    allowed = f"{knob.allowed}, " + " or ".join(f'"{w}"' for w in words)

    def parse(value: Any) -> Any:
        if isinstance(value, str) and value in words:
            return value
        try:
            return knob.check(value)
        except CatalogueError as exc:
            raise _Invalid(exc.problem, allowed) from None

    return parse, allowed


def _choice(*choices: str) -> tuple[Parser, str]:
    allowed = " or ".join(f'"{c}"' for c in choices)

    def parse(value: Any) -> Any:
        if isinstance(value, str) and value in choices:
            return value
        raise _Invalid(f"{show(value)} is not one of them", allowed)

    return parse, allowed


def _int_range(lo: int, hi: int, *words: str, why: str = "") -> tuple[Parser, str]:
    allowed = f"an integer {lo}–{hi}" + "".join(f', "{w}"' for w in words) + (f" ({why})" if why else "")

    def parse(value: Any) -> Any:
        if isinstance(value, str) and value in words:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"{show(value)} is not an integer", allowed)
        if not lo <= value <= hi:
            raise _Invalid(f"{value} is out of range", allowed)
        return value

    return parse, allowed


def _bool_or(*words: str) -> tuple[Parser, str]:
    allowed = "true, false" + "".join(f', "{w}"' for w in words)

    def parse(value: Any) -> Any:
        if isinstance(value, bool) or (isinstance(value, str) and value in words):
            return value
        raise _Invalid(f"{show(value)} is not a boolean", allowed)

    return parse, allowed


def _compressors() -> tuple[Parser, str]:
    allowed = '"auto", "keep", a compressor name or a list of them in order of preference'
    knob = catalogue.SCALAR_KNOBS["zswap.compressor"]

    def parse(value: Any) -> Any:
        if value in (AUTO, KEEP):
            return value
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not names:
            raise _Invalid(f"{show(value)} is not a name or a list of names", allowed)
        try:
            return tuple(knob.check(n) for n in names)
        except CatalogueError as exc:
            raise _Invalid(exc.problem, allowed) from None

    return parse, allowed


def _unit_list() -> tuple[Parser, str]:
    allowed = "a list of unit names such as cups.service"

    def parse(value: Any) -> Any:
        if not isinstance(value, list):
            raise _Invalid(f"{show(value)} is not a list", allowed)
        try:
            return tuple(catalogue.check_unit_name(v) for v in value)
        except CatalogueError as exc:
            raise _Invalid(exc.problem, exc.allowed) from None

    return parse, allowed


def _pattern_list() -> tuple[Parser, str]:
    allowed = "a list of unit names or shell patterns such as 'ollama*'"

    def parse(value: Any) -> Any:
        if not isinstance(value, list) or not all(isinstance(v, str) and v and "/" not in v for v in value):
            raise _Invalid(f"{show(value)} is not a list of patterns", allowed)
        return tuple(value)

    return parse, allowed


def _swap_dirs() -> tuple[Parser, str]:
    allowed = "a non-empty list of: " + ", ".join(catalogue.SWAP_FILE_DIRS)

    def parse(value: Any) -> Any:
        if not isinstance(value, list) or not value or not all(v in catalogue.SWAP_FILE_DIRS for v in value):
            raise _Invalid(f"{show(value)} names a directory the helper will not use", allowed)
        return tuple(value)

    return parse, allowed


def _priorities() -> tuple[Parser, str]:
    classes = [c for c in DEVICE_CLASSES if c != "zram"]
    allowed = f"a table of {', '.join(classes)} → 0–32767, faster classes not below slower ones"

    def parse(value: Any) -> Any:
        if not isinstance(value, dict) or set(value) != set(classes):
            raise _Invalid(f"{show(value)} does not name exactly the classes", allowed)
        for cls in classes:
            v = value[cls]
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 32767:
                raise _Invalid(f"{cls} = {show(v)} is not a priority", allowed)
        ordered = [value[c] for c in classes]
        if ordered != sorted(ordered, reverse=True):
            raise _Invalid("a slower device class is ranked above a faster one", allowed)
        return dict(value)

    return parse, allowed


def _cpus(auto: bool = True) -> tuple[Parser, str]:
    allowed = '"auto" or a list of CPU numbers' if auto else "a list of CPU numbers"

    def parse(value: Any) -> Any:
        if auto and value == AUTO:
            return value
        if (
            isinstance(value, list)
            and value
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 8192 for v in value)
        ):
            return tuple(sorted(set(value)))
        raise _Invalid(f"{show(value)} is not a CPU list", allowed)

    return parse, allowed


def _text(what: str, *, empty: bool = False, words: tuple[str, ...] = ()) -> tuple[Parser, str]:
    allowed = what + "".join(f', "{w}"' for w in words)

    def parse(value: Any) -> Any:
        if isinstance(value, str) and (value or empty) and "\0" not in value and "\n" not in value:
            return value
        raise _Invalid(f"{show(value)} is not {'a string' if empty else 'a non-empty string'} on one line", allowed)

    return parse, allowed


def _text_list() -> tuple[Parser, str]:
    allowed = "a list of strings (jinja2 templates, one per argument)"

    def parse(value: Any) -> Any:
        if isinstance(value, list) and all(isinstance(v, str) and "\0" not in v for v in value):
            return tuple(value)
        raise _Invalid(f"{show(value)} is not a list of strings", allowed)

    return parse, allowed


def _environment() -> tuple[Parser, str]:
    allowed = 'a table of NAME = "value template", NAME of letters, digits and _'

    def parse(value: Any) -> Any:
        if not isinstance(value, dict):
            raise _Invalid(f"{show(value)} is not a table", allowed)
        for name, v in value.items():
            if not (name.replace("_", "a").isalnum() and name.isascii() and not name[0].isdigit()):
                raise _Invalid(f"{show(name)} is not a variable name", allowed)
            if not isinstance(v, str) or "\0" in v:
                raise _Invalid(f"{name} = {show(v)} is not a string", allowed)
        return dict(value)

    return parse, allowed


# What the root helper grants the model process (catalogue.MODEL_*): a policy beyond it could never be applied.
HELPER_BOUNDS = "what the root helper grants the model process"

# The schema: section → key → (parser, allowed values). Defaults live in policies/default.toml.
SCHEMA: dict[str, dict[str, tuple[Parser, str]]] = {
    "vm": {
        "swappiness": _knob_value("vm.swappiness", (AUTO, KEEP)),
        "vfs_cache_pressure": _knob_value("vm.vfs_cache_pressure", (AUTO, KEEP)),
        "page-cluster": _knob_value("vm.page-cluster", (AUTO, KEEP)),
        "watermark_scale_factor": _knob_value("vm.watermark_scale_factor", (KEEP,)),
        "watermark_boost_factor": _knob_value("vm.watermark_boost_factor", (KEEP,)),
        "compaction_proactiveness": _knob_value("vm.compaction_proactiveness", (KEEP,)),
    },
    "zswap": {
        "enabled": _bool_or(AUTO, KEEP),
        "compressor": _compressors(),
        "max_pool_percent": _knob_value("zswap.max_pool_percent", (AUTO, KEEP)),
        "accept_threshold_percent": _knob_value("zswap.accept_threshold_percent", (KEEP,)),
        "shrinker_enabled": _bool_or(AUTO, KEEP),
    },
    "swap": {
        "prioritize": _bool_or(),
        "priorities": _priorities(),
        "file": _choice(AUTO, "off"),
        "file_dirs": _swap_dirs(),
        "file_size_mib": _int_range(catalogue.SWAP_FILE_SIZE.minimum or 0, catalogue.SWAP_FILE_SIZE.maximum or 0, AUTO),
    },
    "services": {
        "disable": _unit_list(),
        "mask": _unit_list(),
        "never_touch": _pattern_list(),
    },
    "process": {
        "cpus": _cpus(),
        "reserve_cores": _int_range(0, 64, AUTO),
        "threads": _int_range(1, 1024, AUTO),
        "sched_policy": _choice(*catalogue.SCHED_POLICIES),
        "nice": _int_range(*catalogue.MODEL_NICE_RANGE, AUTO, why=HELPER_BOUNDS),
        "io_class": _choice(*catalogue.IO_CLASSES),
        "io_priority": _int_range(*catalogue.IO_PRIORITY_RANGE),
        "oom_score_adj": _int_range(*catalogue.MODEL_OOM_SCORE_ADJ_RANGE, why=HELPER_BOUNDS),
        "delay_accounting": _bool_or(KEEP),
    },
    "model": {
        "preset": _choice(*preset_names()),
        "program": _text("a program name or path", words=(AUTO,)),
        "model_path": _text("the path of the model file (a directory for vLLM)", empty=True),
        "context_size": _int_range(256, 1048576),
        "host": _text("an address to listen on such as 127.0.0.1"),
        "port": _int_range(1, 65535),
        "ready_timeout_s": _int_range(1, 3600),
        "supervisor": _choice(AUTO, "launch", "systemd"),
        "keep_resident": _choice(AUTO, "mlock", "cgroup", "none"),
        "memory_high_mib": _int_range(0, 1048576),
        "mmap": _bool_or(AUTO),
        "memory_fit": _choice("warn", "refuse", "off"),
        "args": _text_list(),
        "environment": _environment(),
    },
}


# [calibration]: what `autoglm-tune calibrate` measured and chose, written whole into a drop-in (never in the
# default). Used by "auto" CPU set and threads while it still describes the machine and model (calibrate_core).
CALIBRATION_SCHEMA: dict[str, tuple[Parser, str]] = {
    "cpus": _cpus(auto=False),
    "threads": _int_range(1, 1024),
    "model_path": _text("the path of the model file measured"),
    "model_bytes": _int_range(0, 2**63 - 1),
    "model_mtime_ns": _int_range(0, 2**63 - 1),
    "topology": _text("the CPU topology line calibrate wrote"),
    "date": _text("the date of the calibration"),
    "host": _text("the host name of the machine measured"),
    "reason": _text("one line saying what was measured"),
    "nice": _int_range(*catalogue.MODEL_NICE_RANGE, why=HELPER_BOUNDS),
    "nice_reason": _text("one line saying how nice was measured"),
}
CALIBRATION_OPTIONAL = ("nice", "nice_reason")  # together, where calibrate could compare nice (root)
SECTIONS = {**SCHEMA, "calibration": CALIBRATION_SCHEMA}


@dataclass(frozen=True)
class ModelStamp:
    """A model file as found when the policy was loaded: size and mtime, None when it is not there."""

    path: str
    size: int | None
    mtime_ns: int | None


@dataclass(frozen=True)
class Calibration:
    """The [calibration] table of the last file that has one, and its model file as found now."""

    values: dict[str, Any]
    source: str
    found: ModelStamp


@dataclass(frozen=True)
class Policy:
    """Validated policy values, section → key → value, plus the files they came from, in order."""

    values: dict[str, dict[str, Any]]
    sources: tuple[str, ...]
    calibration: Calibration | None = None

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.values[section]


def show(value: Any) -> str:
    """A value as it is written in the policy file, for error messages (null only comes from JSON)."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return json.dumps(value, default=str)  # TOML dates and times have no JSON form
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f'did you mean "{close[0]}"? ' if close else ""


def validate_document(doc: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """Check one parsed policy document (TOML or JSON) against SCHEMA; return its validated values."""
    out: dict[str, dict[str, Any]] = {}
    for section, table in doc.items():
        if not isinstance(table, dict):
            home = [s for s, keys in SCHEMA.items() if section in keys]
            hint = f"did you mean [{home[0]}] {section}? " if home else ""
            raise BadInput(
                f"{source}: top-level key {section} = {show(table)}: keys belong in a section; {hint}"
                f"allowed sections: {', '.join(f'[{s}]' for s in SECTIONS)}"
            )
        if section not in SECTIONS:
            raise BadInput(
                f"{source}: unknown section [{section}]; {_suggest(section, list(SECTIONS))}"
                f"allowed: {', '.join(f'[{s}]' for s in SECTIONS)}"
            )
        for key, value in table.items():
            if key not in SECTIONS[section]:
                raise BadInput(
                    f"{source}: unknown key [{section}] {key}; {_suggest(key, list(SECTIONS[section]))}"
                    f"allowed: {', '.join(SECTIONS[section])}"
                )
            parse, _ = SECTIONS[section][key]
            try:
                out.setdefault(section, {})[key] = parse(value)
            except _Invalid as exc:
                raise BadInput(
                    f"{source}: [{section}] {key} = {show(value)}: {exc.problem}; allowed: {exc.allowed}"
                ) from None
    cal = out.get("calibration")
    missing = [] if cal is None else [k for k in CALIBRATION_SCHEMA if k not in cal and k not in CALIBRATION_OPTIONAL]
    if cal is not None and not missing and ("nice" in cal) != ("nice_reason" in cal):
        missing = ["nice_reason" if "nice" in cal else "nice"]
    if missing:
        raise BadInput(f"{source}: [calibration] lacks {', '.join(missing)}; it is written whole by "
                       "'autoglm-tune calibrate'; allowed: the file calibrate wrote, or none")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a policy value")


def _read_policy(path: Path) -> dict[str, Any]:
    """One policy file, bounded before it is parsed: TOML, or JSON when its name ends in .json (one schema, two
    encodings; JSON is what a program writes, e.g. the Ansible module's inline policy)."""
    kind = "JSON" if path.suffix == ".json" else "TOML"
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_POLICY_BYTES + 1)
    except FileNotFoundError:
        raise BadInput(f"{path}: no such policy file") from None
    except IsADirectoryError:
        raise BadInput(f"{path}: is a directory, not a policy file") from None
    except OSError as exc:
        raise BadInput(f"{path}: cannot read policy file ({exc.strerror})") from None
    if len(data) > MAX_POLICY_BYTES:
        raise BadInput(f"{path}: more than {MAX_POLICY_BYTES} bytes; allowed: a policy file of at most "
                       f"{MAX_POLICY_BYTES} bytes")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not valid {kind} (not UTF-8 text)") from None
    if kind == "TOML":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise BadInput(f"{path}: not valid TOML ({exc})") from None
    try:
        doc = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise BadInput(f"{path}: not valid JSON (nested too deep)") from None
    except ValueError as exc:
        raise BadInput(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise BadInput(f"{path}: a JSON policy is {show(doc)}; allowed: an object of sections, "
                       '{"vm": {"swappiness": 100}, …}')
    return doc


def default_policy_text() -> str:
    from autoglm_tune.policies import DIRECTORY

    return (DIRECTORY / "default.toml").read_text()


def policy_files(explicit: Path | None, etc_dir: Path | None = None) -> list[Path]:
    """The system policy files that exist, in resolution order, then the explicit one."""
    etc = etc_dir or Path(os.environ.get("AUTOGLM_TUNE_ETC", DEFAULT_ETC))
    files = [etc / "policy.toml"] if (etc / "policy.toml").is_file() else []
    drop_ins = etc / "policy.d"
    if drop_ins.is_dir():
        try:
            files += sorted(p for p in drop_ins.iterdir() if p.suffix in POLICY_SUFFIXES and p.is_file())
        except OSError as exc:
            raise BadInput(f"{drop_ins}: cannot read the policy drop-ins ({exc.strerror})") from None
    if explicit is not None:
        files.append(explicit)
    return files


def load_policy(explicit: Path | None = None, etc_dir: Path | None = None) -> Policy:
    """Merge the default, the system files and `explicit`, key by key, later files winning."""
    merged = validate_document(tomllib.loads(default_policy_text()), "built-in default policy")
    missing = [f"[{s}] {k}" for s, keys in SCHEMA.items() for k in keys if k not in merged.get(s, {})]
    assert not missing, f"policies/default.toml lacks {missing}"
    sources = ["built-in default"]
    calibration = None
    for path in policy_files(explicit, etc_dir):
        doc = validate_document(_read_policy(path), str(path))
        if "calibration" in doc:  # a measurement, taken whole: the last file's
            values = doc.pop("calibration")
            calibration = Calibration(values, str(path), _stamp(values["model_path"]))
        for section, values in doc.items():
            merged[section].update(values)
        sources.append(str(path))
    return Policy(values=merged, sources=tuple(sources), calibration=calibration)


def _stamp(path: str) -> ModelStamp:
    try:
        st = os.stat(path)
    except OSError:
        return ModelStamp(path, None, None)
    return ModelStamp(path, st.st_size, st.st_mtime_ns)

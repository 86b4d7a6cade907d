"""Model server presets shipped in policies/presets/*.toml: the command template, health endpoint and
environment for one kind of server. A preset file is package data and trusted like the default policy,
but still checked, so a broken one fails with its file and key named.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput

_KEYS = {"description", "program", "model_file", "command", "health", "environment", "probe"}


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    program: str  # argv[0] unless [model] program overrides it
    model_file: bool  # whether the server reads [model] model_path (ollama uses its own store)
    command: tuple[str, ...]  # jinja2 templates, one per argument
    health: str  # jinja2 template of the readiness URL
    environment: dict[str, str]  # name → jinja2 template
    probe: tuple[str, ...] | None = None  # arguments after the program that print its help; None: not probed


def _directory() -> Path:
    from autoglm_tune.policies import DIRECTORY

    return DIRECTORY / "presets"


def preset_names() -> list[str]:
    """The built-in preset names, sorted (file names without .toml)."""
    return sorted(p.name.removesuffix(".toml") for p in _directory().iterdir() if p.name.endswith(".toml"))


def _strings(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def load_preset(name: str) -> Preset:
    """The named preset; BadInput naming the allowed presets when there is no such preset."""
    names = preset_names()
    if name not in names:
        raise BadInput(f"[model] preset = {name!r}: no such preset; allowed: {', '.join(names)}")
    source = f"preset {name} (policies/presets/{name}.toml)"
    try:
        doc = tomllib.loads(_directory().joinpath(f"{name}.toml").read_text())
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{source}: not valid TOML ({exc})") from None
    problems = [f"unknown key {k}" for k in sorted(set(doc) - _KEYS)]
    problems += [f"missing key {k}" for k in sorted(_KEYS - set(doc) - {"environment", "probe"})]
    if not problems:
        env = doc.get("environment", {})
        for key, ok in (
            ("description", isinstance(doc["description"], str)),
            ("program", isinstance(doc["program"], str) and doc["program"] != ""),
            ("model_file", isinstance(doc["model_file"], bool)),
            ("command", _strings(doc["command"])),
            ("health", isinstance(doc["health"], str) and doc["health"].startswith("http://")),
            ("environment", isinstance(env, dict) and all(isinstance(v, str) for v in env.values())),
            ("probe", "probe" not in doc or _strings(doc["probe"])),
        ):
            if not ok:
                problems.append(f"bad value for {key}")
    if problems:
        raise BadInput(
            f"{source}: {'; '.join(problems)}; allowed: description, program, model_file (bool), "
            "command (list of templates), health (http:// URL template), [environment] (name = template), "
            "probe (the arguments that print the server's help)"
        )
    return Preset(
        name=name,
        description=doc["description"],
        program=doc["program"],
        model_file=doc["model_file"],
        command=tuple(doc["command"]),
        health=doc["health"],
        environment=dict(doc.get("environment", {})),
        probe=tuple(doc["probe"]) if "probe" in doc else None,
    )

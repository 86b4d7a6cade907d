"""The `autoglm-tune` command line. An imperative shell: read input, call the pure core, print.

Errors are typed (errors.py) and mapped to exit codes here, once.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any

# Plain one-line usage errors instead of rich panels (and a faster start); set before typer loads.
os.environ.setdefault("TYPER_USE_RICH", "0")

import typer

from .bench.cli import register as register_bench
from .calibrate_cli import register as register_calibrate
from .cli_helper import register
from .cli_system import register as register_system
from .errors import EXIT_DIFFERS, BadInput, TuneError, fail

if TYPE_CHECKING:  # imported on use: `diff`'s start-up stays as measured
    from .facts import Facts
    from .planner import Plan

APP_SETTINGS: dict[str, Any] = {"add_completion": False, "no_args_is_help": True, "pretty_exceptions_enable": False}
app = typer.Typer(**APP_SETTINGS)

def _version(value: bool) -> None:
    """--version: the installed distribution's version (importlib.metadata, imported only for this)."""
    if value:
        from importlib.metadata import version

        typer.echo(f"autoglm-tune {version('autoglm-tune')}")
        raise typer.Exit()


@app.callback()
def _main(
    _: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_version, help="Print the version and exit.")
    ] = False,
) -> None:
    """Plan, apply and roll back system tuning for a local LLM server on a low-spec Linux machine."""


PolicyOpt = Annotated[Path | None, typer.Option("--policy", help="Policy TOML applied after the system policy files.")]
SysrootOpt = Annotated[Path | None, typer.Option("--sysroot", help="Read facts from a snapshot tree laid out like /.")]
FactsOpt = Annotated[
    Path | None,
    typer.Option("--facts", help="Read facts from the JSON of an earlier 'facts --json' (plan: or a folder of them)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _facts(sysroot: Path | None, facts_file: Path | None) -> Facts:
    from .collect import collect_facts
    from .facts import facts_from_json

    if sysroot is not None and facts_file is not None:
        raise BadInput("--sysroot and --facts: give one source of facts, not both")
    if facts_file is not None:
        try:
            text = facts_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInput(f"--facts {facts_file}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
        return facts_from_json(text, f"--facts {facts_file}")
    return collect_facts(sysroot or Path("/"))


def _plan(policy_file: Path | None, sysroot: Path | None, facts_file: Path | None) -> Plan:
    from .planner import make_plan
    from .policy import load_policy

    policy = load_policy(policy_file)
    return make_plan(_facts(sysroot, facts_file), policy)


def _color() -> bool:
    return sys.stdout.isatty()


@app.command()
def facts(
    policy: PolicyOpt = None, sysroot: SysrootOpt = None, facts_file: FactsOpt = None, json_out: JsonOpt = False
) -> None:
    """What the tool sees on this machine."""
    from . import render

    try:
        from .policy import load_policy

        pol = load_policy(policy)  # validated so a bad --policy is reported here too
        f = _facts(sysroot, facts_file)
        if pol.calibration is not None and sysroot is None and facts_file is None:  # measured on this machine
            from .calibrate_core import calibration_facts

            f = replace(f, calibration=calibration_facts(pol.calibration, f.cpu, pol["model"]["model_path"]))
    except TuneError as exc:
        raise fail(exc) from None
    typer.echo(f.to_json() if json_out else render.facts_text(f), nl=False)


def _plan_folder(policy_file: Path | None, sysroot: Path | None, folder: Path, json_out: bool, toml_out: bool) -> str:
    """Plan every *.json facts file in `folder` (a fleet's collected facts): JSON keyed by file name, or per host
    the changes. Every file is read and planned before anything is printed: one bad file, one error line."""
    from . import render
    from .facts import facts_from_json
    from .planner import make_plan
    from .policy import load_policy

    if sysroot is not None:
        raise BadInput("--sysroot and --facts: give one source of facts, not both")
    if toml_out:
        raise BadInput(f"--facts {folder}: --toml writes one plan; allowed with a folder: text or --json")
    files = sorted(folder.glob("*.json"))
    if not files:
        raise BadInput(f"--facts {folder}: no *.json file; expected one 'facts --json' output per host")
    policy = load_policy(policy_file)
    plans = {}
    for path in files:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInput(f"--facts {path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
        host_facts = facts_from_json(text, f"--facts {path}")
        try:
            plans[path.name] = make_plan(host_facts, policy)
        except BadInput as exc:  # a policy value this host cannot take (its CPUs, threads): name the host's file
            raise BadInput(f"--facts {path}: {exc}") from None
    if json_out:
        return render.to_json({name: p.to_dict() for name, p in plans.items()})
    return "".join(f"{p.host or 'unknown host'} ({name}): {render.diff_text(p)}" for name, p in plans.items())


@app.command()
def plan(
    policy: PolicyOpt = None,
    sysroot: SysrootOpt = None,
    facts_file: FactsOpt = None,
    json_out: JsonOpt = False,
    toml_out: Annotated[bool, typer.Option("--toml", help="Print TOML.")] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the plan to FILE.")] = None,
) -> None:
    """The tuning plan, each change with its reason. With --facts DIR: a summary for every host's facts file."""
    from . import render

    try:
        if json_out and toml_out:
            raise BadInput("--json and --toml: choose one output format")
        if facts_file is not None and facts_file.is_dir():
            text = _plan_folder(policy, sysroot, facts_file, json_out, toml_out)
        else:
            p = _plan(policy, sysroot, facts_file)
            if toml_out:
                text = render.plan_toml(p)
            elif json_out:
                text = render.to_json(p.to_dict())
            else:
                text = render.plan_text(p, color=output is None and _color())
        if output is not None:
            try:
                output.write_text(text)
            except OSError as exc:
                raise BadInput(f"-o {output}: cannot write ({exc.strerror})") from None
        else:
            typer.echo(text, nl=False)
    except TuneError as exc:
        raise fail(exc) from None


@app.command()
def diff(
    policy: PolicyOpt = None, sysroot: SysrootOpt = None, facts_file: FactsOpt = None, json_out: JsonOpt = False
) -> None:
    """Current vs planned, per knob. Exit 0 in sync, 1 differs, 2 bad input."""
    from . import render

    try:
        p = _plan(policy, sysroot, facts_file)
    except TuneError as exc:
        raise fail(exc) from None
    typer.echo(render.to_json(render.diff_json(p)) if json_out else render.diff_text(p, color=_color()), nl=False)
    if not p.in_sync:
        raise typer.Exit(EXIT_DIFFERS)


register(app)
register_bench(app)
register_calibrate(app)
register_system(app)


@app.command(context_settings={"allow_interspersed_args": False})
def launch(
    cmd: Annotated[list[str] | None, typer.Argument(help="Run this command instead of the preset's.")] = None,
    policy: PolicyOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would run; start nothing.")] = False,
    json_out: JsonOpt = False,
    unit: Annotated[
        bool, typer.Option("--unit", help="Print a systemd model service unit instead (with --dry-run: its spec).")
    ] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the unit to FILE.")] = None,
    log: Annotated[Path | None, typer.Option("--log", help="The server's output goes here.")] = None,
) -> None:
    """Start the model server with the planned CPU set, threads and priorities; wait until it is ready."""
    import shutil
    from importlib import resources

    from . import launch as lc
    from . import render
    from .planner import make_plan
    from .policy import load_policy
    from .presets import load_preset

    try:
        if output is not None and not unit:
            raise BadInput("-o/--output: only with --unit")
        if unit and json_out and not dry_run:
            raise BadInput("--unit and --json: choose one output; allowed: --unit --dry-run --json (the unit's spec)")
        pol = load_policy(policy)
        p = make_plan(_facts(None, None), pol)
        model = pol["model"]
        preset = load_preset(model["preset"])
        model_file = lc.check_model_path(model, preset, cmd)
        machine = lc.gather(model_file)
        if cmd is None and preset.probe is not None:  # the preset's flags are checked against what the build lists
            found = shutil.which(lc.program_of(model, preset))
            machine = replace(machine, program_flags=lc.probe_flags(found, args=preset.probe) if found else None)
        if unit:  # a persistent unit: decided as for a transient one (MemoryLow=, LimitMEMLOCK=, MemoryHigh=)
            model, machine = {**model, "supervisor": "systemd"}, replace(machine, systemd_helper=True)
        spec = lc.build_spec(p.process, model, preset, machine, cmd)
        spec = lc.resolve_program(spec, shutil.which, required=not dry_run)
        if unit and not dry_run:
            template = resources.files("autoglm_tune.policies").joinpath("model.service.j2").read_text()
            import pwd

            user = None if os.getuid() == 0 else pwd.getpwuid(os.getuid()).pw_name  # the server runs as its caller
            text = lc.render_unit(spec, template, user)
            if output is None:
                typer.echo(text, nl=False)
            else:
                try:
                    output.write_text(text)
                except OSError as exc:
                    raise BadInput(f"-o {output}: cannot write ({exc.strerror})") from None
            lc.print_warnings(spec)
            return
        if dry_run:
            if lc.port_in_use(spec.host, spec.port):
                spec.warnings.append(f"{spec.host}:{spec.port} is in use now: a launch would fail")
            if json_out:
                typer.echo(render.to_json(spec.to_dict()), nl=False)
            else:
                typer.echo(lc.spec_text(spec), nl=False)
            return
        lc.print_warnings(spec)
        code = _start(lc, spec, model, log or lc.default_log(), json_out)
    except TuneError as exc:
        raise fail(exc) from None
    raise typer.Exit(code)


def _start(lc: ModuleType, spec: Any, model: dict[str, Any], log: Path, json_out: bool) -> int:
    """As a transient unit through the root helper, or as our child; under supervisor = "auto" a helper that does
    not answer or does not allow it means our child, said plainly."""
    from .helper_client import HelperUnreachable, NotAuthorized

    if spec.supervisor == "systemd":
        try:
            return lc.run_unit(spec, log, json_out, sys.stdout, sys.stderr)
        except (HelperUnreachable, NotAuthorized) as exc:
            if model["supervisor"] != "auto":
                raise
            typer.echo(f"autoglm-tune: warning: {exc}; starting the model as a child of autoglm-tune", err=True)
            spec = lc.as_child(spec)
    return lc.run(spec, log, json_out, sys.stdout, sys.stderr)


def _only(name: str) -> typer.Typer | None:
    """An app holding only the command (or group) `name`, with the same options and callback; None when no
    command has that name."""
    commands = [c for c in app.registered_commands
                if (c.name or typer.main.get_command_name(c.callback.__name__ if c.callback else "")) == name]
    groups = [g for g in app.registered_groups if g.name == name]
    if not commands and not groups:
        return None
    only = typer.Typer(**APP_SETTINGS)
    only.registered_callback = app.registered_callback
    only.registered_commands = commands
    only.registered_groups = groups
    return only


def main() -> None:
    """Typer reads every command's signature and type hints when it builds the app (about 10 ms of `diff`'s
    start-up, README "Performance"), so only the command named on the line is built; no command, an option
    first or an unknown name builds them all, for the usage list and "No such command"."""
    only = _only(sys.argv[1]) if len(sys.argv) > 1 else None
    (only or app)()

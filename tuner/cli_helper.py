"""The commands that go through the root helper: apply, rollback, status, verify.

Registered on the main app by cli.py (`register(app)`). Errors are typed (errors.py, helper_client.py)
and turned into exit codes in `_run`, once; with --json the error is printed as a JSON object too.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer
from autoglm_helper.contract import plan_schema
from autoglm_helper.contract.catalogue import CatalogueError
from autoglm_helper.contract.plan_schema import Change

from .errors import EXIT_DIFFERS, EXIT_OK, BadInput, Interrupted, TuneError, fail

PolicyOpt = Annotated[Path | None, typer.Option("--policy", help="Policy TOML applied after the system policy files.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Check everything against the live system; change nothing.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Go ahead even where live values changed since.")]


def _client() -> ModuleType:
    """The D-Bus client, imported on use: plan and diff start without dbus-fast and asyncio."""
    from . import helper_client

    return helper_client


def _show(v: object) -> str:
    return "(none)" if v is None else ("on" if v is True else "off" if v is False else str(v))


class Call:
    """How far the one changing call of a command got (Apply or Rollback, not a dry-run), so that an interrupt
    can say truthfully what the root helper may have done: not sent, sent without a reply, or its reply."""

    def __init__(self) -> None:
        self.sent = ""  # the command whose call went out: "apply" or "rollback"
        self.report: dict[str, Any] | None = None  # the helper's reply, once it arrived

    def send(self, command: str, method: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        self.sent = command
        self.report = method(*args)
        return self.report

    def interrupted(self) -> tuple[str, bool | None]:
        """The line for an interrupt, and whether something changed (None: it may have)."""
        if not self.sent:
            return "interrupted before anything was sent to the root helper: nothing changed", False
        if self.report is None:
            return (f"interrupted while the root helper was running {self.sent}: it may have committed; "
                    "'autoglm-tune status' tells, 'autoglm-tune rollback --last' undoes it"), None
        result, txid = self.report["result"], self.report["txid"]
        undo = f"; 'autoglm-tune rollback {txid}' undoes it" if result == "committed" else ""
        return f"interrupted after the root helper replied: {result} {txid}".rstrip() + undo, result != "unchanged"


def _run(json_out: bool, body: Callable[[Call], int]) -> None:
    """Run a command body; map typed errors to their exit code (and a JSON object under --json). Ctrl-C is exit
    130 with a line saying whether the helper committed; after the body is done it no longer interrupts."""
    call = Call()
    try:
        code = body(call)
    except TuneError as exc:
        if json_out:
            typer.echo(json.dumps({"changed": False, "failed": True, "error": type(exc).__name__, "msg": str(exc)}))
        raise fail(exc) from None
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this report short
        line, changed = call.interrupted()
        if json_out:
            typer.echo(json.dumps({"changed": changed, "failed": True, "error": "Interrupted", "msg": line,
                                   "txid": call.report["txid"] if call.report else ""}))
        raise fail(Interrupted(line)) from None
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # everything is printed: the exit status stands
    raise typer.Exit(code)


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise BadInput("stdin is not a terminal, so there is no one to confirm; allowed: --yes to go ahead")
    try:
        return typer.confirm(question, default=False)
    except typer.Abort as exc:  # click turns Ctrl-C at the prompt into Abort; end of input is a no
        if isinstance(exc.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        return False


def _print_changes(report: dict[str, Any], dry_label: str) -> None:
    for c in report["changes"]:
        new = c["target"] if c.get("new") is None else c["new"]
        state = dry_label if report["result"] == "dry-run" else c["state"]
        typer.echo(f"  {c['subject']:<40} {_show(c['old'])} → {_show(new)}   {state}")


def _planned(policy: Path | None, plan_file: Path | None) -> tuple[dict[str, Any], list[Change]]:
    """The plan to send: made now from this machine and the policy, or read from --plan (validated here too)."""
    if plan_file is None:
        from .collect import collect_facts
        from .planner import make_plan
        from .policy import load_policy

        made = make_plan(collect_facts(Path("/")), load_policy(policy))
        return made.to_dict(), made.changes
    if policy is not None:
        raise BadInput("--plan and --policy: give one of them")
    plan = read_plan_file(plan_file)
    try:
        return plan, plan_schema.changes_from_plan(plan)
    except CatalogueError as exc:
        raise BadInput(f"--plan {plan_file}: {exc}") from None


PLAN_FILE_ALLOWED = "allowed: the output of 'plan --json -o FILE' or 'plan --toml -o FILE'"


def read_plan_file(path: Path) -> dict[str, Any]:
    """A saved plan: one schema, two encodings (JSON or TOML, by suffix, else by content). The size is bounded
    before anything is parsed; what cannot be a plan is BadInput naming the file."""
    import tomllib

    try:
        with path.open("rb") as fh:
            raw = fh.read(plan_schema.MAX_PLAN_BYTES + 1)
    except OSError as exc:
        raise BadInput(f"--plan {path}: cannot read ({exc.strerror}); {PLAN_FILE_ALLOWED}") from None
    if len(raw) > plan_schema.MAX_PLAN_BYTES:
        raise BadInput(f"--plan {path}: larger than {plan_schema.MAX_PLAN_BYTES} bytes; {PLAN_FILE_ALLOWED}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"--plan {path}: not UTF-8 text; {PLAN_FILE_ALLOWED}") from None
    if not text.strip():
        raise BadInput(f"--plan {path}: is empty; {PLAN_FILE_ALLOWED}")
    as_json = path.suffix == ".json" or (path.suffix != ".toml" and text.lstrip().startswith("{"))
    try:
        plan = json.loads(text) if as_json else tomllib.loads(text)
        json.dumps(plan)  # what goes to the helper: TOML dates and times have no JSON form
    except (ValueError, TypeError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        kind = "JSON" if as_json else "TOML"
        raise BadInput(f"--plan {path}: not a {kind} plan ({str(exc).splitlines()[0]}); {PLAN_FILE_ALLOWED}") from None
    if not isinstance(plan, dict):
        raise BadInput(f"--plan {path}: not a plan object; {PLAN_FILE_ALLOWED}")
    return plan


def apply(
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    json_out: JsonOpt = False,
    policy: PolicyOpt = None,
    force: ForceOpt = False,
    plan_file: Annotated[
        Path | None,
        typer.Option("--plan", help="Apply this saved plan ('plan --json|--toml -o FILE') instead of planning."),
    ] = None,
) -> None:
    """Apply the plan through the root helper: one call, journaled, undone on failure."""

    def body(call: Call) -> int:
        plan, changes = _planned(policy, plan_file)
        if not json_out:
            typer.echo(f"{len(changes)} setting(s) to change:" if changes else "in sync: nothing to change")
            for c in changes:
                typer.echo(f"  {c.subject:<40} {_show(c.current)} → {_show(c.target)}   ({c.reason})")
        if not changes:
            if json_out:
                typer.echo(json.dumps({"changed": False, "result": "unchanged", "txid": "", "changes": []}))
            return EXIT_OK
        if not dry_run and not yes and not _confirm("Apply these changes?"):
            typer.echo("nothing changed")
            return EXIT_OK
        client = _client()
        report = client.apply(plan, True, force) if dry_run else call.send("apply", client.apply, plan, False, force)
        would = any(c["old"] != c["target"] for c in report["changes"])
        changed = report["result"] == "committed" or (dry_run and would)
        if json_out:
            typer.echo(json.dumps({"changed": changed, "dry_run": dry_run, **report}))
        else:
            typer.echo(f"{report['result']} {report['txid']}".rstrip() + ":")
            _print_changes(report, "would change")
        return EXIT_OK

    _run(json_out, body)


def rollback(
    txid: Annotated[str | None, typer.Argument(help="The transaction to undo (see 'status').")] = None,
    last: Annotated[bool, typer.Option("--last", help="Undo the last committed transaction (the default).")] = False,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    json_out: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Undo an applied transaction exactly; values changed since are reported, not clobbered."""

    def body(call: Call) -> int:
        if txid is not None and last:
            raise BadInput("TXID and --last: give one of them")
        if not dry_run and not yes:
            preview = _client().rollback(txid or "", True, force)
            if preview["result"] == "unchanged":
                return _nothing_to_roll_back(json_out, dry_run)
            if not json_out:
                typer.echo(f"would roll back {preview['txid']}:")
                _print_changes(preview, "would be undone")
            if not _confirm("Roll back these changes?"):
                typer.echo("nothing changed")
                return EXIT_OK
            report = call.send("rollback", _client().rollback, preview["txid"], False, force)
        elif dry_run:
            report = _client().rollback(txid or "", True, force)
        else:
            report = call.send("rollback", _client().rollback, txid or "", False, force)
        if report["result"] == "unchanged":
            return _nothing_to_roll_back(json_out, dry_run)
        if json_out:
            # a dry-run would change something where a step's live value is not its old one already
            would = any(c.get("live") is not None and c["live"] != c["old"] for c in report["changes"])
            changed = report["result"] != "dry-run" or would
            typer.echo(json.dumps({"changed": changed, "dry_run": dry_run, **report}))
        else:
            typer.echo(f"{report['result']} {report['txid']}:")
            _print_changes(report, "would be undone")
        return EXIT_OK

    _run(json_out, body)


def _nothing_to_roll_back(json_out: bool, dry_run: bool) -> int:
    """No committed transaction: done already (exit 0), as systemctl stop on a stopped unit."""
    if json_out:
        typer.echo(json.dumps({"changed": False, "dry_run": dry_run, "result": "unchanged", "txid": "", "changes": []}))
    else:
        typer.echo("nothing to roll back")
    return EXIT_OK


ComparePolicyOpt = Annotated[
    Path | None, typer.Option("--policy", help="Also compare the live machine with the plan this policy gives.")
]


def _against_plan(policy: Path | None) -> dict[str, Any] | None:
    """With --policy: this machine against the plan made from its facts and that policy (as `diff --json`)."""
    if policy is None:
        return None
    from . import render
    from .collect import collect_facts
    from .planner import make_plan
    from .policy import load_policy

    return render.diff_json(make_plan(collect_facts(Path("/")), load_policy(policy)))


def status(
    json_out: JsonOpt = False,
    log: Annotated[Path | None, typer.Option("--log", help="The model's log, as given to 'launch --log'.")] = None,
    policy: ComparePolicyOpt = None,
) -> None:
    """Transactions (id, time, caller, state), what is applied now, drift, and the running model."""

    def body(_: Call) -> int:
        from .launch import default_log
        from .model_status import model_lines, model_report

        against = _against_plan(policy)
        client = _client()
        report = client.status()
        model = model_report(log or default_log())
        if json_out:
            typer.echo(json.dumps({**report, "model": model, **({"plan": against} if against else {})}, indent=2))
            return EXIT_OK
        if against is not None:
            _print_plan_differences(against)
        typer.echo("transactions:" if report["transactions"] else "transactions: none")
        for tx in report["transactions"]:
            caller = f"uid {tx['caller']['uid']} pid {tx['caller']['pid']}"
            typer.echo(f"  {tx['txid']}  {tx['time']}  {caller:<22} {tx['state']}")
        typer.echo("applied:" if report["applied"] else "applied: nothing")
        for a in report["applied"]:
            mark = "" if a["live"] == a["new"] else f"   DRIFT: now {_show(a['live'])}"
            typer.echo(f"  {a['subject']:<40} {_show(a['old'])} → {_show(a['new'])}  ({a['txid']}){mark}")
        for q in report.get("quarantined", []):  # journal files the helper set aside, untouched
            typer.echo(f"quarantined journal file: {q['file']}: {q['reason']}")
        if model is None:
            typer.echo("model: not running (started by 'autoglm-tune launch' as this user)")
        else:
            for line in model_lines(model["record"], model["process"], model["delays"]):
                typer.echo(line)
        return EXIT_OK

    _run(json_out, body)


def _print_plan_differences(against: dict[str, Any]) -> None:
    for c in against["changes"]:
        typer.echo(f"differs from the plan: {c['subject']} is {_show(c['current'])}, planned {_show(c['target'])}")


def verify(json_out: JsonOpt = False, policy: ComparePolicyOpt = None) -> None:
    """Check that what was applied is still live (with --policy: and that the machine matches that plan).
    Exit 0 in place, 1 drift."""

    def body(_: Call) -> int:
        against = _against_plan(policy)
        report = _client().status()
        drift = report["drift"]
        in_sync = not drift and (against is None or against["in_sync"])
        if json_out:
            out = {"in_sync": in_sync, "drift": drift, "applied": report["applied"]}
            typer.echo(json.dumps({**out, **({"plan": against} if against else {})}, indent=2))
            return EXIT_OK if in_sync else EXIT_DIFFERS
        for d in drift:
            typer.echo(f"drift: {d['subject']} is {_show(d['live'])}, applied {_show(d['new'])} ({d['txid']})")
        if against is not None:
            _print_plan_differences(against)
        if in_sync:
            plan = " and the machine matches the plan" if against is not None else ""
            typer.echo(f"in sync: {len(report['applied'])} applied setting(s) still live{plan}")
        return EXIT_OK if in_sync else EXIT_DIFFERS

    _run(json_out, body)


def register(app: typer.Typer) -> None:
    for command in (apply, rollback, status, verify):
        app.command()(command)

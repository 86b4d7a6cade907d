"""The `autoglm-tune calibrate` command's options; the machinery is in calibrate.py, imported on use so that other
commands do not pay for it (registered on the main app by cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .errors import TuneError, fail


def calibrate_command(
    model: Annotated[Path | None, typer.Option("--model", help="The GGUF model (default: [model] model_path).")] = None,
    budget: Annotated[str, typer.Option("--budget", help="Time to measure for, such as 120s or 2m.")] = "120s",
    json_out: Annotated[bool, typer.Option("--json", help="Print the measurements as JSON.")] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the policy drop-in to FILE, such as "
                                                "/etc/autoglm-tune/policy.d/50-calibrated.toml (default: stdout).")]
    = None,
    policy: Annotated[Path | None, typer.Option("--policy", help="Policy TOML applied after the system policy "
                                                "files.")] = None,
    llama_bench: Annotated[Path | None, typer.Option("--llama-bench", help="llama-bench binary (default: beside "
                                                     "the preset's server, PATH, the cached host build).")] = None,
) -> None:
    """Measure the model's decode speed on this machine's candidate CPU sets, choose one, write it as a drop-in."""
    from .calibrate import calibrate

    try:
        text = calibrate(model, budget, json_out, output, policy, llama_bench)
    except TuneError as exc:
        raise fail(exc) from None
    typer.echo(text, nl=False)


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate_command)

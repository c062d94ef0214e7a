"""``relaywarden doctor``: the troubleshooting procedure of KB 895853, automated.

Exit code 0 when every check is ok, 1 with warnings, 2 with failures.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from ..diagnose.model import Context, Level, exit_code
from ..diagnose.registry import all_checks, run_checks, selected
from ..directory import Directory
from ..dns import make_resolver
from ..users import UserStore

_STYLE = {Level.OK: "green", Level.WARN: "yellow", Level.FAIL: "bold red", Level.SKIP: "dim"}


def build_context(loaded, data_dir: Path, *, live: bool, timeout: float) -> Context:
    directory = Directory.build(loaded, UserStore(data_dir).records())
    return Context(loaded=loaded, data_dir=data_dir, directory=directory,
                   resolver=make_resolver(loaded.config.dns), live=live, timeout=timeout)


def doctor_command_factory(config_option, data_dir_option, load):
    @click.command("doctor")
    @config_option
    @data_dir_option
    @click.option("--offline", is_flag=True, help="Skip the checks that connect to the listeners or query DNS.")
    @click.option("--check", "only", multiple=True, help="Run only this check or group, by dotted name: dns runs dns.mx and dns.rdns (repeatable).")
    @click.option("--timeout", default=10.0, show_default=True, help="Seconds per network operation.")
    @click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
    def doctor(config_path, data_dir: Path, offline: bool, only: tuple[str, ...], timeout: float, as_json: bool) -> None:
        """Run KB 895853's troubleshooting procedure against this server and print what to fix."""
        names = [name for name, _ in all_checks()]
        unknown = [o for o in only if not any(selected(name, {o}) for name in names)]
        if unknown:
            groups = sorted({name.split(".")[0] for name in names})
            raise click.UsageError(
                f"no check named {', '.join(repr(u) for u in unknown)}: use a check or a group of "
                f"`--check`: {', '.join(groups)} (or a dotted name such as {names[0]})")
        loaded = load(config_path)
        ctx = build_context(loaded, data_dir, live=not offline, timeout=timeout)
        findings = asyncio.run(run_checks(ctx, set(only) or None))
        code = exit_code(findings)
        if as_json:
            click.echo(json.dumps({"config": loaded.file, "data_dir": str(data_dir), "exit_code": code,
                                   "findings": [f.to_dict() for f in findings]}, indent=2))
            sys.exit(code)
        console = Console(highlight=False, soft_wrap=True)
        section = None
        for f in findings:
            if f.section != section:
                section = f.section
                console.print(f"\n[bold]{escape(section)}[/bold]")
            console.print(f"  [{_STYLE[f.level]}]{f.level.value.upper():<4}[/] {escape(f.title)}"
                          + (f"  [dim]({escape(f.where)})[/dim]" if f.where else ""))
            for line in f.evidence:
                console.print(f"       [dim]{escape(line)}[/dim]")
            if f.fix and f.level in (Level.WARN, Level.FAIL):
                console.print(f"       fix: {escape(f.fix)}")
        counts = {lvl: sum(1 for f in findings if f.level is lvl) for lvl in Level}
        console.print(f"\n{counts[Level.OK]} ok, {counts[Level.WARN]} warnings, {counts[Level.FAIL]} failures, "
                      f"{counts[Level.SKIP]} skipped")
        sys.exit(code)

    return doctor

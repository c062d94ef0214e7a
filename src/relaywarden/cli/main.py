"""The ``relaywarden`` command: serve, init, check-config, user, explain.

Thin: each command loads what it needs and calls the modules that do the work.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..config.document import render
from ..config.loader import ConfigError, LoadedConfig, file_problems, load_config, load_default
from ..directory import Directory, lookup_key
from ..users import UserError, UserStore, hash_password

DATA_ENV = "RELAYWARDEN_DATA"


def data_dir_option(f):
    return click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), envvar=DATA_ENV,
                        default=Path("relaywarden-data"), show_default=True,
                        help=f"Data directory (queue, event log, users, TLS). Also ${DATA_ENV}.")(f)


def config_option(f):
    return click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                        default=None, help="Configuration file (default: the embedded default).")(f)


def load(config_path: Path | None) -> LoadedConfig:
    try:
        return load_config(config_path) if config_path else load_default()
    except ConfigError as exc:
        click.echo(f"relaywarden: invalid configuration {exc.source}:", err=True)
        for p in exc.problems:
            click.echo(f"  {p}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="relaywarden")
def main() -> None:
    """relaywarden: a mail relay whose every relay decision is explained."""


@main.command()
@config_option
@data_dir_option
@click.option("--no-uvloop", is_flag=True, help="Use asyncio's own event loop.")
def serve(config_path: Path | None, data_dir: Path, no_uvloop: bool) -> None:
    """Run the server (the embedded default configuration unless --config)."""
    from ..server.app import run

    loaded = load(config_path)
    _stop_on_file_problems(loaded)
    sys.exit(run(loaded, data_dir, use_uvloop=not no_uvloop))


def _stop_on_file_problems(loaded: LoadedConfig) -> None:
    problems = file_problems(loaded)
    if problems:
        click.echo(f"relaywarden: invalid configuration {loaded.file}:", err=True)
        for p in problems:
            click.echo(f"  {p}", err=True)
        sys.exit(2)


@main.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path), default=Path("relaywarden.toml"))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(path: Path, force: bool) -> None:
    """Write the default configuration, every key commented, to PATH."""
    if path.exists() and not force:
        raise click.ClickException(f"{path} exists; use --force to overwrite it")
    try:
        path.write_text(render(load_default().config), encoding="utf-8")
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc.strerror}"
                                   + (f" (create {path.parent} first)" if not path.parent.is_dir() else "")) from None
    click.echo(f"wrote {path}; check it with: relaywarden check-config {path}")


@main.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def check_config(path: Path) -> None:
    """Validate a configuration file; every error names the file, line, key and fix."""
    from ..policy.audit import check_startable, open_relay_findings

    loaded = load(path)
    _stop_on_file_problems(loaded)
    fails = check_startable(loaded)
    findings = open_relay_findings(loaded)
    for f in findings:
        if f in fails and not loaded.config.server.allow_open_relay:
            continue
        click.echo(f"{f.where}: {f.level}: listener {f.listener}: {f.message}\n    fix: {f.fix}")
    if fails and not loaded.config.server.allow_open_relay:
        click.echo(f"{path}: refused: this configuration makes an open relay", err=True)
        for f in fails:
            click.echo(f"  {f.where}: listener {f.listener}: {f.message}\n    fix: {f.fix}", err=True)
        sys.exit(2)
    if fails:
        click.echo(f"{path}: WARNING: open relay allowed by server.allow_open_relay = true")
    click.echo(f"{path}: ok ({len(loaded.config.listener)} listeners, {len(loaded.config.domain)} domains, "
               f"{len(loaded.config.mailbox)} mailboxes, {len(loaded.config.route)} routes)")


# --- users ------------------------------------------------------------------------------------

@main.group()
def user() -> None:
    """Manage SMTP AUTH users (argon2 hashes in DATA_DIR/users.json)."""


def _password(given: str | None, stdin: bool) -> str:
    if given is not None:
        return given
    if stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return click.prompt("Password", hide_input=True, confirmation_prompt=True)


def _config_mailboxes(config_path: Path | None) -> tuple[LoadedConfig, dict[str, str]]:
    """The configuration and every address its mailboxes own (lookup key -> mailbox)."""
    loaded = load(config_path)
    owned: dict[str, str] = {}
    for mailbox in loaded.config.mailbox:
        for address in (mailbox.address, *mailbox.aliases):
            owned.setdefault(lookup_key(address), mailbox.address)
    return loaded, owned


@user.command("add")
@click.argument("address")
@click.option("--password", default=None, help="The password (prefer the prompt or --password-stdin).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.option("--no-relay", is_flag=True, help="Create the user without the relay right.")
@click.option("--alias", "aliases", multiple=True, help="Another address of this mailbox (repeatable).")
@config_option
@data_dir_option
def user_add(address: str, password: str | None, password_stdin: bool, no_relay: bool, aliases,
             config_path: Path | None, data_dir: Path) -> None:
    """Add a user (a mailbox that may authenticate). Neither it nor its aliases may be an address
    another mailbox owns (in the user database or in the configuration, --config)."""
    _, owned = _config_mailboxes(config_path)
    try:
        UserStore(data_dir).add(address, _password(password, password_stdin), relay=not no_relay,
                                aliases=tuple(aliases), taken=owned)
    except UserError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"added {address}")


def _update(address: str, config_path: Path | None, data_dir: Path, **changes) -> None:
    loaded, owned = _config_mailboxes(config_path)
    primaries = [m.address for m in loaded.config.mailbox]
    try:
        UserStore(data_dir).update(address, config_mailboxes=primaries, source=loaded.file, **changes)
    except UserError as exc:
        raise click.ClickException(str(exc)) from None


@user.command("passwd")
@click.argument("address")
@click.option("--password", default=None)
@click.option("--password-stdin", is_flag=True)
@config_option
@data_dir_option
def user_passwd(address: str, password: str | None, password_stdin: bool, config_path: Path | None,
                data_dir: Path) -> None:
    """Set the password of a user, or of a mailbox of the configuration (--config)."""
    _update(address, config_path, data_dir, password_hash=hash_password(_password(password, password_stdin)))
    click.echo(f"password of {address} changed")


@user.command("delete")
@click.argument("address")
@data_dir_option
def user_delete(address: str, data_dir: Path) -> None:
    """Delete a user from the user database (for a mailbox of the configuration: the password
    and flags set with these commands; the mailbox itself stays in the configuration)."""
    try:
        UserStore(data_dir).delete(address)
    except UserError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"deleted {address}")


def _flag_command(name: str, help_text: str, **change):
    @user.command(name, help=help_text + " The address must be a user, or a mailbox of the configuration (--config).")
    @click.argument("address")
    @config_option
    @data_dir_option
    def cmd(address: str, config_path: Path | None, data_dir: Path) -> None:
        _update(address, config_path, data_dir, **change)
        click.echo(f"{address}: {name} done")
    return cmd


_flag_command("disable", "Disable a user: no AUTH, no mail accepted for it.", enabled=False)
_flag_command("enable", "Enable a user again.", enabled=True)
_flag_command("suspend-relay", "Suspend a user's relay right (a compromised account).", relay=False)
_flag_command("enable-relay", "Give a user back its relay right.", relay=True)


@user.command("list")
@config_option
@data_dir_option
@click.option("--json", "as_json", is_flag=True)
def user_list(config_path: Path | None, data_dir: Path, as_json: bool) -> None:
    """List mailboxes: configuration and user database merged."""
    directory = Directory.build(load(config_path), UserStore(data_dir).records())
    rows = [{"address": e.address, "aliases": list(e.aliases), "password": e.password_hash is not None,
             "enabled": e.enabled, "relay": e.relay, "source": e.source} for e in directory]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("address", "aliases", "password", "enabled", "relay", "source")
    for r in rows:
        table.add_row(r["address"], ", ".join(r["aliases"]), "yes" if r["password"] else "no",
                      "yes" if r["enabled"] else "NO", "yes" if r["relay"] else "SUSPENDED", r["source"])
    Console().print(table)


@user.command("hash")
@click.option("--password-stdin", is_flag=True)
def user_hash(password_stdin: bool) -> None:
    """Print an argon2 hash for a [[mailbox]] password_hash key."""
    click.echo(hash_password(_password(None, password_stdin)))


# The other commands live in modules of their own; they import the options above.
from .doctor_cmd import doctor_command_factory  # noqa: E402
from .events_cmd import events_command  # noqa: E402
from .explain import explain_command  # noqa: E402
from .ndr_cmd import ndr as ndr_group  # noqa: E402
from .queue_cmd import queue_group  # noqa: E402
from .relay_test_cmd import relay_test_command  # noqa: E402
from .why_cmd import why_command  # noqa: E402

main.add_command(explain_command, "explain")
main.add_command(queue_group)
main.add_command(events_command)
main.add_command(why_command)
main.add_command(ndr_group, "ndr")
main.add_command(doctor_command_factory(config_option, data_dir_option, load))
main.add_command(relay_test_command, "relay-test")


if __name__ == "__main__":
    main()

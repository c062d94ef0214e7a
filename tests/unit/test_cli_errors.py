"""Command-line mistakes end in a one-line error and a non-zero exit, never a traceback."""

from __future__ import annotations

from click.testing import CliRunner

from relaywarden.cli.main import main
from relaywarden.queue.store import SqliteQueue


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_doctor_refuses_a_check_name_that_matches_nothing(tmp_path):
    result = invoke("doctor", "--offline", "--check", "open_relay", "--data-dir", str(tmp_path))
    assert result.exit_code == 2 and result.exception.__class__ is SystemExit
    assert "no check named 'open_relay'" in result.output and "open-relay" in result.output
    # a group and a dotted name still select checks
    assert invoke("doctor", "--offline", "--check", "open-relay", "--data-dir", str(tmp_path)).exit_code == 0
    assert invoke("doctor", "--offline", "--check", "open-relay.config", "--data-dir", str(tmp_path)).exit_code == 0


def test_queue_filter_with_a_bad_regular_expression(tmp_path):
    SqliteQueue(tmp_path / "queue.sqlite").close()
    for command in (("queue", "list"), ("queue", "hold", "--yes"), ("queue", "delete", "--yes")):
        result = invoke(*command, "--reply", "([", "--data-dir", str(tmp_path))
        assert result.exit_code == 2, result.output
        assert "--reply '([' is not a valid regular expression" in result.output
        assert "Traceback" not in result.output


def test_init_into_a_directory_that_does_not_exist(tmp_path):
    result = invoke("init", str(tmp_path / "nodir" / "x.toml"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "cannot write" in result.output and f"create {tmp_path / 'nodir'} first" in result.output


def test_check_config_and_serve_name_a_certificate_that_cannot_be_read(tmp_path):
    from relaywarden.config.loader import default_text

    cert = tmp_path / "cert.pem"
    cert.write_text("not read here")
    text = default_text().replace('tls = "starttls"',
                                  f'tls = "starttls"\ncertificate = "{cert}"\nkey = "{tmp_path / "missing.key"}"', 1)
    config = tmp_path / "rw.toml"
    config.write_text(text)
    line = text.splitlines().index(f'key = "{tmp_path / "missing.key"}"') + 1
    for command in (("check-config", str(config)), ("serve", "--config", str(config), "--data-dir", str(tmp_path / "d"))):
        result = invoke(*command)
        assert result.exit_code == 2, result.output
        assert f"{config}:{line}: listener[0].key: {tmp_path / 'missing.key'} does not exist" in result.output
        assert "listener[0].certificate" not in result.output          # that one exists
    assert not (tmp_path / "d").exists()                                # serve stopped before anything

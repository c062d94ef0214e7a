"""The command line: init, check-config, and the user database (argon2 at rest)."""

import json

from click.testing import CliRunner

from relaywarden.cli.main import main
from relaywarden.config.loader import default_text, load_config, load_default
from relaywarden.directory import Directory
from relaywarden.users import UserStore, verify_password


def run(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def test_init_writes_a_valid_commented_default(tmp_path):
    path = tmp_path / "relaywarden.toml"
    r = run("init", str(path))
    assert r.exit_code == 0, r.output
    assert load_config(path).config == load_default().config
    assert run("init", str(path)).exit_code != 0          # no silent overwrite
    r = run("check-config", str(path))
    assert r.exit_code == 0 and "ok (2 listeners" in r.output


def test_check_config_reports_errors_with_file_and_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[listener]]\nname = "mx"\nport = 0\n')
    r = CliRunner().invoke(main, ["check-config", str(path)])
    assert r.exit_code == 2
    assert f"{path}:3: listener[0].port" in r.output


def test_check_config_refuses_an_open_relay(tmp_path):
    path = tmp_path / "open.toml"
    path.write_text('[[listener]]\nname = "mx"\nport = 2525\n[listener.relay]\nmode = "all-except"\n')
    r = CliRunner().invoke(main, ["check-config", str(path)])
    assert r.exit_code == 2 and "open relay" in r.output
    path.write_text('[server]\nallow_open_relay = true\n' + path.read_text())
    r = CliRunner().invoke(main, ["check-config", str(path)])
    assert r.exit_code == 0 and "WARNING" in r.output


def test_user_lifecycle(tmp_path):
    d = str(tmp_path)
    assert run("user", "add", "bob@example.test", "--password-stdin", "--data-dir", d, input="pw one\n").exit_code == 0
    raw = (tmp_path / "users.json").read_text()
    assert "pw one" not in raw and "$argon2id$" in raw
    rec = UserStore(tmp_path).get("BOB@example.test")
    assert verify_password(rec.password_hash, "pw one") and not verify_password(rec.password_hash, "pw two")
    assert CliRunner().invoke(main, ["user", "add", "bob@example.test", "--password", "x", "--data-dir", d]).exit_code != 0
    assert run("user", "passwd", "bob@example.test", "--password-stdin", "--data-dir", d, input="pw two\n").exit_code == 0
    assert verify_password(UserStore(tmp_path).get("bob@example.test").password_hash, "pw two")
    assert run("user", "disable", "bob@example.test", "--data-dir", d).exit_code == 0
    assert run("user", "suspend-relay", "postmaster@example.test", "--data-dir", d).exit_code == 0
    directory = Directory.build(load_default(), UserStore(tmp_path).records())
    assert directory.login("bob@example.test").enabled is False
    pm = directory.login("postmaster@example.test")
    assert pm.relay is False and pm.source.startswith("<embedded default>:")   # overlay keeps the config source
    listed = json.loads(run("user", "list", "--json", "--data-dir", d).output)
    assert {u["address"] for u in listed} == {"bob@example.test", "postmaster@example.test"}
    assert run("user", "enable", "bob@example.test", "--data-dir", d).exit_code == 0
    assert Directory.build(load_default(), UserStore(tmp_path).records()).login("bob@example.test").enabled


def test_an_unknown_user_never_verifies():
    # verify_password(None, ...) runs argon2 against a dummy hash (same cost) and is False
    assert verify_password(None, "anything") is False


def test_changing_an_unknown_address_is_refused_and_creates_nothing(tmp_path):
    d = str(tmp_path)
    for args, stdin in ((("passwd", "nobody@example.test", "--password-stdin"), "x\n"),
                        (("disable", "ghost@example.test"), None), (("enable", "ghost@example.test"), None),
                        (("suspend-relay", "ghost@example.test"), None),
                        (("enable-relay", "ghost@example.test"), None)):
        result = CliRunner().invoke(main, ["user", *args, "--data-dir", d], input=stdin)
        assert result.exit_code == 1, (args, result.output)
        assert "neither a user" in result.output and "relaywarden user add" in result.output
    assert UserStore(tmp_path).records() == []
    # a mailbox of the configuration may be changed (an overlay row), also one of a --config file
    assert run("user", "passwd", "postmaster@example.test", "--password-stdin", "--data-dir", d, input="pw\n").exit_code == 0
    config = tmp_path / "rw.toml"
    config.write_text(default_text().replace("postmaster@example.test", "carol@example.test"))
    assert CliRunner().invoke(main, ["user", "disable", "carol@example.test", "--data-dir", d]).exit_code == 1
    assert run("user", "disable", "carol@example.test", "--config", str(config), "--data-dir", d).exit_code == 0
    assert {r.address for r in UserStore(tmp_path).records()} == {"postmaster@example.test", "carol@example.test"}


def test_an_address_belongs_to_one_mailbox_only(tmp_path):
    d = str(tmp_path)
    assert run("user", "add", "bob@example.test", "--password", "x", "--alias", "b@example.test", "--data-dir", d).exit_code == 0
    for args in (("eve@example.test", "--alias", "bob@example.test"),       # another user's address
                 ("eve@example.test", "--alias", "B@example.test"),         # another user's alias
                 ("eve@example.test", "--alias", "postmaster@example.test"),  # a configuration mailbox
                 ("b@example.test",),                                       # an alias as a new user
                 ("eve@example.test", "--alias", "eve@example.test")):      # its own address
        result = CliRunner().invoke(main, ["user", "add", *args, "--password", "x", "--data-dir", d])
        assert result.exit_code == 1 and ("belongs to mailbox" in result.output
                                          or "already an alias of mailbox bob@example.test" in result.output), (args, result.output)
    assert {r.address for r in UserStore(tmp_path).records()} == {"bob@example.test"}


def test_delete_removes_a_user_or_a_mailbox_overlay(tmp_path):
    d = str(tmp_path)
    assert run("user", "add", "bob@example.test", "--password", "x", "--data-dir", d).exit_code == 0
    assert run("user", "suspend-relay", "postmaster@example.test", "--data-dir", d).exit_code == 0
    assert run("user", "delete", "BOB@example.test", "--data-dir", d).output == "deleted BOB@example.test\n"
    assert run("user", "delete", "postmaster@example.test", "--data-dir", d).exit_code == 0
    assert UserStore(tmp_path).records() == []
    pm = Directory.build(load_default(), UserStore(tmp_path).records()).login("postmaster@example.test")
    assert pm is not None and pm.relay is True              # the configuration's mailbox is back as written
    result = CliRunner().invoke(main, ["user", "delete", "bob@example.test", "--data-dir", d])
    assert result.exit_code == 1 and "is not a user" in result.output

"""The README's two commands, tried as a new user would: on a fresh clone of this repository.

``git clone`` of the committed HEAD into a temporary directory; the serve command from the
README's "Two commands" block (it makes its own .venv from PyPI, so this takes minutes the first
time); wait for the two default listeners; a message to postmaster@example.test with Python's
smtplib (and swaks when installed) answered 250; SIGTERM; exit status 0. The test command is not
run here (it would run this test again) but CI must call it: ``.ci/run`` runs ``scripts/test``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PORTS = (2525, 2587)
SETUP_TIMEOUT = 600.0   # a fresh .venv with pip install from PyPI


def readme_commands(readme: str) -> list[list[str]]:
    """The commands of the first ``sh`` block under "## Two commands", comments dropped."""
    section = readme.split("## Two commands", 1)
    assert len(section) == 2, "README has no '## Two commands' section"
    block = re.search(r"```sh\n(.*?)```", section[1], re.S)
    assert block, "no ```sh block under '## Two commands'"
    commands = []
    for line in block.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            commands.append(shlex.split(line))
    return commands


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def clean_env(home: Path) -> dict[str, str]:
    """The environment of a new user's shell: no project venv on PATH, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "RELAYWARDEN_DATA")
           and not k.startswith("PYTEST_")}
    venv_bin = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    if not (REPO / ".git").exists():
        pytest.skip(f"{REPO} is not a git checkout")
    dest = tmp_path_factory.mktemp("readme") / "relaywarden"
    r = subprocess.run(["git", "clone", "--quiet", str(REPO), str(dest)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return dest


def test_ci_runs_the_readme_test_command(clone: Path) -> None:
    commands = readme_commands((clone / "README.md").read_text())
    assert ["scripts/test"] in commands, commands
    ci = clone / ".ci" / "run"
    assert ci.exists() and os.access(ci, os.X_OK), ".ci/run is missing or not executable"
    calls = [shlex.split(line) for line in ci.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert any(words and words[0] in ("scripts/test", "./scripts/test", "exec") and "scripts/test" in
               " ".join(words) for words in calls), f".ci/run does not call scripts/test:\n{ci.read_text()}"
    assert os.access(clone / "scripts" / "test", os.X_OK)


@pytest.mark.integration
@pytest.mark.timeout(SETUP_TIMEOUT + 180)
def test_readme_serve_command_on_a_fresh_clone(clone: Path, tmp_path: Path) -> None:
    commands = readme_commands((clone / "README.md").read_text())
    serve = next((c for c in commands if c[0] == "scripts/serve"), None)
    assert serve is not None, f"no scripts/serve command in the README: {commands}"
    taken = [p for p in DEFAULT_PORTS if port_in_use(p)]
    if taken:
        pytest.skip(f"127.0.0.1 port(s) {taken} already in use by another process; the default "
                    f"configuration needs 2525 and 2587 free")

    data = tmp_path / "data"
    log = tmp_path / "serve.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*serve, "--data-dir", str(data)], cwd=clone, env=clean_env(tmp_path),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def output() -> str:
        return log.read_text(errors="replace")

    try:
        deadline = time.monotonic() + SETUP_TIMEOUT
        while not all(listening(p) for p in DEFAULT_PORTS):
            assert proc.poll() is None, f"scripts/serve exited with {proc.returncode}:\n{output()}"
            assert time.monotonic() < deadline, f"not listening within {SETUP_TIMEOUT}s:\n{output()}"
            time.sleep(0.5)
        # the banner follows the listening sockets by a moment (the queue is opened in between)
        banner_deadline = time.monotonic() + 30
        while "events " not in output() and time.monotonic() < banner_deadline:
            time.sleep(0.2)
        text = output()
        assert "127.0.0.1:2525" in text and "127.0.0.1:2587" in text, text
        assert str(data.resolve()) in text, f"the data directory is not printed:\n{text}"

        with smtplib.SMTP("127.0.0.1", 2525, timeout=30) as smtp:
            code, banner = smtp.ehlo("readme.client.example.org")
            assert code == 250, banner
            assert smtp.mail("newuser@client.example.org")[0] == 250
            assert smtp.rcpt("postmaster@example.test")[0] == 250
            code, reply = smtp.data(b"Subject: hello from the README test\r\n\r\nIt works.\r\n")
            assert code == 250, reply
            assert b"queued as" in reply
        if shutil.which("swaks"):
            r = subprocess.run(["swaks", "--server", "127.0.0.1:2525", "--from", "swaks@client.example.org",
                                "--to", "postmaster@example.test", "--h-Subject", "README test (swaks)",
                                "--timeout", "30"], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr
            assert re.search(r"^<[-~] +250 2\.0\.0 .*queued as", r.stdout, re.M), r.stdout

        # scripts/serve execs relaywarden: the process it started is the server itself
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"relaywarden did not stop within 30 s of SIGTERM:\n{output()}")
        assert code == 0, f"exit status {code} after SIGTERM:\n{output()}"
        assert not any(listening(p) for p in DEFAULT_PORTS)
        assert (data / "queue.sqlite").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

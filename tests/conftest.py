"""Fixtures shared by the suite: trustme certificates and real relaywarden servers."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from tests.support.server import QUEUE_ONLY_CONFIG, RelayServer


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def cert_files(ca, tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("mx.example.test", "localhost", "127.0.0.1")
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


@pytest.fixture(scope="session")
def client_tls(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
def start_server(tmp_path, cert_files):
    """start_server(config_text=QUEUE_ONLY_CONFIG, users={addr: password}) -> a running RelayServer."""
    servers: list[RelayServer] = []

    def start(config: str = QUEUE_ONLY_CONFIG, *, users: dict[str, str] | None = None, name: str = "srv",
              env: dict[str, str] | None = None) -> RelayServer:
        srv = RelayServer(config, tmp_path / name, cert=cert_files[0], key=cert_files[1], env=env)
        for address, password in (users or {}).items():
            r = srv.run_cli("user", "add", address, "--password-stdin", "--data-dir", str(srv.data_dir),
                            input=password + "\n")
            assert r.returncode == 0, r.stderr
        servers.append(srv)
        return srv.start()

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def default_server(tmp_path_factory, cert_files):
    """One server on the test default configuration (delivery off), shared by a module's dialog tests."""
    d = tmp_path_factory.mktemp("default")
    srv = RelayServer(QUEUE_ONLY_CONFIG, d / "srv", cert=cert_files[0], key=cert_files[1])
    r = srv.run_cli("user", "add", "alice@example.test", "--password-stdin", "--data-dir", str(srv.data_dir),
                    input="correct horse\n")
    assert r.returncode == 0, r.stderr
    srv.start()
    yield srv
    srv.stop()

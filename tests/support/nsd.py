"""Debian's nsd as a real authoritative DNS server on loopback, serving zone files a test writes.

    with NsdServer(tmp_path, {"example.test": ZONE_TEXT}) as dns:
        resolver = make_resolver(Dns(nameservers=["127.0.0.1"], port=dns.port))

Zone text may use ``$ORIGIN``-relative names; an SOA and NS are added when missing.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

NSD = shutil.which("nsd") or "/usr/sbin/nsd"


def available() -> bool:
    return Path(NSD).exists()


def _free_udp_tcp_port() -> int:
    for _ in range(50):
        with socket.socket() as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port for nsd")


class NsdServer:
    def __init__(self, directory: Path, zones: dict[str, str]):
        self.dir = Path(directory) / "nsd"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_udp_tcp_port()
        self.zones = zones
        self.proc: subprocess.Popen | None = None

    def _write(self) -> Path:
        conf = [
            "server:",
            f"  ip-address: 127.0.0.1@{self.port}",
            '  username: ""', '  chroot: ""', '  database: ""',
            f'  zonesdir: "{self.dir}"', f'  pidfile: "{self.dir}/nsd.pid"',
            f'  xfrdfile: "{self.dir}/xfrd.state"', f'  zonelistfile: "{self.dir}/zone.list"',
            f'  logfile: "{self.dir}/nsd.log"', "  verbosity: 1", "  server-count: 1",
            "  hide-version: yes",
            "remote-control:", "  control-enable: no",
        ]
        for name, text in self.zones.items():
            body = text if "SOA" in text else (
                f"$ORIGIN {name}.\n$TTL 60\n@ IN SOA ns.{name}. hostmaster.{name}. 1 3600 600 86400 60\n"
                f"@ IN NS ns.{name}.\nns IN A 127.0.0.1\n" + text)
            (self.dir / f"{name}.zone").write_text(body)
            conf += ["zone:", f"  name: {name}", f'  zonefile: "{name}.zone"']
        path = self.dir / "nsd.conf"
        path.write_text("\n".join(conf) + "\n")
        return path

    def start(self, timeout: float = 10.0) -> NsdServer:
        conf = self._write()
        check = subprocess.run(["nsd-checkconf", str(conf)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nsd-checkconf: {check.stdout}{check.stderr}")
        self.proc = subprocess.Popen([NSD, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nsd exited: {self.proc.stderr.read().decode(errors='replace')}")
            if self._answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("nsd did not answer in time")

    def _answers(self) -> bool:
        import dns.message
        import dns.query

        name = next(iter(self.zones))
        try:
            dns.query.udp(dns.message.make_query(name, "SOA"), "127.0.0.1", port=self.port, timeout=0.3)
            return True
        except Exception:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        # its children take about a second to leave after the main process
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind(("127.0.0.1", self.port))
                break
            except OSError:
                time.sleep(0.1)

    def __enter__(self) -> NsdServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

"""`relaywarden doctor --check dnsbl / dns.mx / dns.rdns` against nsd on loopback.

nsd serves real zone files: block lists that list test addresses (IPv4 and IPv6 nibble names,
Spamhaus ZEN codes under a loopback copy of zen.spamhaus.org, a list that refuses with
127.255.255.254), accepted domains whose MX points at the right listener, at the wrong address,
at a listener with anonymous access off or without the domain in accept_domains, and reverse
zones whose PTR matches the EHLO name, names another host, or is missing.  The doctor runs as a
subprocess with [dns] nameservers = 127.0.0.1 and nsd's port: no query leaves loopback.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import dns.reversename
import pytest

from tests.support import nsd

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not nsd.available(), reason="nsd not installed (scripts/install-peers)"),
]


def _ptr6(address: str) -> str:
    return dns.reversename.from_address(address).to_text()


def _bl6(address: str, zone: str) -> str:
    return _ptr6(address).removesuffix("ip6.arpa.") + zone + "."


ZONES = {
    "dnsbl.test": (
        "2.0.0.127 IN A 127.0.0.2\n"
        '2.0.0.127 IN TXT "the DNSBL test entry"\n'
        "25.2.0.192 IN A 127.0.0.2\n"
        '25.2.0.192 IN TXT "192.0.2.25 sent spam to our traps, see https://dnsbl.test/q?ip=192.0.2.25"\n'
        f"{_bl6('2001:db8::25', 'dnsbl.test')} IN A 127.0.0.2\n"
        "40.2.0.192 IN A 10.0.0.1\n"                     # not a block list answer
    ),
    "zen.spamhaus.org": (
        "25.2.0.192 IN A 127.0.0.4\n"
        '25.2.0.192 IN TXT "https://check.spamhaus.org/query/ip/192.0.2.25"\n'
        "30.2.0.192 IN A 127.0.0.10\n"
    ),
    "refusing.test": "* IN A 127.255.255.254\n",
    "mail.test": (
        "mx IN A 192.0.2.25\n"
        "mx IN AAAA 2001:db8::25\n"
        "sub IN A 192.0.2.26\n"
        "partner IN A 192.0.2.27\n"
        "other IN A 203.0.113.9\n"
        "liar IN A 203.0.113.9\n"
        "smtp IN A 192.0.2.27\n"
        "good IN MX 10 mx\n"
        "wrong IN MX 10 other\n"
        "mixed IN MX 10 mx\n"
        "mixed IN MX 20 other\n"
        "tosub IN MX 10 sub\n"
        "topartner IN MX 10 partner\n"
        "implicit IN A 192.0.2.25\n"
    ),
    "2.0.192.in-addr.arpa": (
        "$ORIGIN 2.0.192.in-addr.arpa.\n$TTL 60\n"
        "@ IN SOA ns.mail.test. hostmaster.mail.test. 1 3600 600 86400 60\n@ IN NS ns.mail.test.\n"
        "25 IN PTR mx.mail.test.\n"
        "26 IN PTR liar.mail.test.\n"
        "27 IN PTR smtp.mail.test.\n"
    ),
    "8.b.d.0.1.0.0.2.ip6.arpa": (
        "$ORIGIN 8.b.d.0.1.0.0.2.ip6.arpa.\n$TTL 60\n"
        "@ IN SOA ns.mail.test. hostmaster.mail.test. 1 3600 600 86400 60\n@ IN NS ns.mail.test.\n"
        f"{_ptr6('2001:db8::25')} IN PTR mx.mail.test.\n"
    ),
}


@pytest.fixture(scope="module")
def nsd_port(tmp_path_factory):
    with nsd.NsdServer(tmp_path_factory.mktemp("dns"), ZONES) as server:
        yield server.port


def _config(port: int, *, public_mx: list[str], domains: list[str], zones: list[str],
            hostname: str = "mx.mail.test", public_sub: list[str] = (),
            public_partner: list[str] = (), timeout: float = 2.0, route_kind: str = "mx") -> str:
    text = f"""\
[server]
hostname = "{hostname}"

[[listener]]
name = "mx"
address = "127.0.0.1"
port = 2525
anonymous = true
public_addresses = {json.dumps(public_mx)}

[[listener]]
name = "submission"
address = "127.0.0.1"
port = 2587
anonymous = false
auth = ["PLAIN"]
allow_authenticated = true
public_addresses = {json.dumps(list(public_sub))}

[[listener]]
name = "partner"
address = "127.0.0.1"
port = 2526
anonymous = true
accept_domains = ["{domains[0]}"]
public_addresses = {json.dumps(list(public_partner))}
"""
    for d in domains:
        text += f'\n[[domain]]\nname = "{d}"\nkind = "authoritative"\n'
    text += f"""
[[mailbox]]
address = "postmaster@{domains[0]}"

[[route]]
name = "default"
domains = ["*"]
kind = "{route_kind}"
{'hosts = ["smarthost.mail.test"]' if route_kind == "smarthost" else ""}

[dns]
nameservers = ["127.0.0.1"]
port = {port}
timeout = {timeout}

[doctor]
dnsbl_zones = {json.dumps(zones)}
"""
    return text


def _doctor(tmp_path: Path, config: str, *checks: str) -> tuple[int, dict]:
    path = tmp_path / "relaywarden.toml"
    path.write_text(config)
    args = [sys.executable, "-m", "relaywarden", "doctor", "--config", str(path),
            "--data-dir", str(tmp_path / "data"), "--json", "--timeout", "3"]
    for c in checks:
        args += ["--check", c]
    done = subprocess.run(args, capture_output=True, text=True, timeout=90)
    assert done.stdout, done.stderr
    report = json.loads(done.stdout)
    assert report["exit_code"] == done.returncode
    return done.returncode, report


def _by_check(report: dict, check: str) -> list[dict]:
    return [f for f in report["findings"] if f["check"] == check]


def _line_of(config: str, needle: str, after: str = "") -> int:
    lines = config.splitlines()
    start = next(i for i, l in enumerate(lines) if after in l) if after else 0
    return next(i for i, l in enumerate(lines) if i >= start and needle in l) + 1


# --- block lists -----------------------------------------------------------------------------

def test_dnsbl_listed_addresses_fail_with_meaning_reason_and_delisting(tmp_path, nsd_port):
    config = _config(nsd_port, public_mx=["192.0.2.25", "2001:db8::25"], domains=["good.mail.test"],
                     zones=["dnsbl.test", "zen.spamhaus.org", "refusing.test"])
    code, report = _doctor(tmp_path, config, "dnsbl")
    assert code == 2
    listed = _by_check(report, "dnsbl.listed")
    titles = sorted(f["title"] for f in listed)
    assert titles == ["192.0.2.25 is listed in dnsbl.test", "192.0.2.25 is listed in zen.spamhaus.org",
                      "2001:db8::25 is listed in dnsbl.test"]
    assert all(f["level"] == "fail" and f["section"] == "block lists" for f in listed)

    generic = next(f for f in listed if f["title"] == "192.0.2.25 is listed in dnsbl.test")
    assert "25.2.0.192.dnsbl.test -> 127.0.0.2: listed" in generic["evidence"][0]
    assert any("sent spam to our traps" in e for e in generic["evidence"])
    assert "relaywarden doctor --check open-relay" in generic["fix"]
    assert "relaywarden doctor --check accounts" in generic["fix"]
    assert "request removal of 192.0.2.25 at the web site of dnsbl.test" in generic["fix"]
    assert generic["where"].endswith(f":{_line_of(config, 'public_addresses')}")

    zen = next(f for f in listed if "zen.spamhaus.org" in f["title"])
    assert "127.0.0.4: XBL (Exploits Block List)" in zen["evidence"][0]
    assert "https://check.spamhaus.org/" in zen["fix"]

    v6 = next(f for f in listed if f["title"].startswith("2001:db8::25"))
    assert v6["evidence"][0].startswith("5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
                                        ".dnsbl.test -> 127.0.0.2")

    [refused] = _by_check(report, "dnsbl.refused")     # one finding per zone, not a listing
    assert refused["level"] == "warn"
    assert refused["title"].startswith("refusing.test refused to answer for 192.0.2.25, 2001:db8::25")
    assert "127.255.255.254: query refused: the query came through a public or open resolver" \
        in refused["evidence"][0]
    assert f"set [dns] nameservers ({report['config']}:{_line_of(config, 'nameservers')}; now 127.0.0.1)" \
        in refused["fix"]
    assert [f["title"] for f in _by_check(report, "dnsbl.clean")] == [
        "2001:db8::25 is not listed in zen.spamhaus.org"]


def test_dnsbl_healthy_addresses_are_ok(tmp_path, nsd_port):
    config = _config(nsd_port, public_mx=["198.51.100.7", "2001:db8::7"], domains=["good.mail.test"],
                     zones=["dnsbl.test", "zen.spamhaus.org"])
    code, report = _doctor(tmp_path, config, "dnsbl")
    assert code == 0, report
    assert [f["title"] for f in report["findings"]] == [
        "198.51.100.7 is on none of the 2 block lists", "2001:db8::7 is on none of the 2 block lists"]


def test_dnsbl_pbl_listing_points_at_a_smarthost_and_bogus_zone_is_a_warning(tmp_path, nsd_port):
    config = _config(nsd_port, public_mx=["192.0.2.30", "192.0.2.40"], domains=["good.mail.test"],
                     zones=["zen.spamhaus.org", "dnsbl.test"])
    code, report = _doctor(tmp_path, config, "dnsbl")
    assert code == 2
    [pbl] = _by_check(report, "dnsbl.listed")
    assert pbl["title"] == "192.0.2.30 is listed in zen.spamhaus.org"
    assert "PBL (Policy Block List), listed by the ISP" in pbl["evidence"][0]
    assert "smarthost" in pbl["fix"] and "open-relay" not in pbl["fix"]
    [bogus] = _by_check(report, "dnsbl.zone")
    assert bogus["level"] == "warn" and "10.0.0.1" in bogus["evidence"][0]
    assert bogus["where"].endswith(f":{_line_of(config, 'dnsbl_zones')}")


def test_dnsbl_unanswered_zone_and_timeout_are_warnings(tmp_path, nsd_port):
    config = _config(nsd_port, public_mx=["198.51.100.7"], domains=["good.mail.test"],
                     zones=["unserved.test"])
    code, report = _doctor(tmp_path, config, "dnsbl")
    assert code == 1
    [unchecked] = report["findings"]
    assert unchecked["check"] == "dnsbl.unchecked" and "7.100.51.198.unserved.test" in unchecked["evidence"][0]

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:   # a nameserver that never answers
        silent.bind(("127.0.0.1", 0))
        config = _config(silent.getsockname()[1], public_mx=["198.51.100.7"], domains=["good.mail.test"],
                         zones=["dnsbl.test"], timeout=0.3)
        code, report = _doctor(tmp_path, config, "dnsbl")
    assert code == 1
    [timeout] = report["findings"]
    assert timeout["check"] == "dnsbl.unchecked" and "timed out" in timeout["evidence"][0]


def test_dnsbl_without_public_address_says_what_to_set(tmp_path, nsd_port):
    # bound to the wildcard address (only the configuration is read; nothing listens)
    config = _config(nsd_port, public_mx=[], domains=["good.mail.test"], zones=["dnsbl.test"]).replace(
        'address = "127.0.0.1"\nport = 2525', 'address = "0.0.0.0"\nport = 2525', 1)
    code, report = _doctor(tmp_path, config, "dnsbl")
    assert code == 1
    [f] = report["findings"]
    assert f["check"] == "dnsbl.no-public-address" and f["level"] == "warn"
    assert "route default delivers straight" in f["evidence"][0]
    assert "public_addresses" in f["fix"]

    loopback_only = _config(nsd_port, public_mx=[], domains=["good.mail.test"], zones=["dnsbl.test"])
    smarthost_only = _config(nsd_port, public_mx=[], domains=["good.mail.test"], zones=["dnsbl.test"],
                             route_kind="smarthost").replace('address = "127.0.0.1"', 'address = "0.0.0.0"', 1)
    for quiet in (loopback_only, smarthost_only):   # a local setup; no MX delivery and nothing on 25
        code, report = _doctor(tmp_path, quiet, "dnsbl")
        [f] = report["findings"]
        assert code == 0 and f["level"] == "skip", f


def test_dnsbl_offline_is_skipped(tmp_path, nsd_port):
    config = _config(nsd_port, public_mx=["192.0.2.25"], domains=["good.mail.test"], zones=["dnsbl.test"])
    path = tmp_path / "c.toml"
    path.write_text(config)
    done = subprocess.run([sys.executable, "-m", "relaywarden", "doctor", "--config", str(path),
                           "--data-dir", str(tmp_path / "d"), "--json", "--offline", "--check", "dnsbl"],
                          capture_output=True, text=True, timeout=60)
    report = json.loads(done.stdout)
    assert [f["level"] for f in report["findings"]] == ["skip"] and done.returncode == 0


# --- MX -> listener (scenario 3) -------------------------------------------------------------

def test_mx_and_reverse_dns_healthy(tmp_path, nsd_port):
    config = _config(nsd_port, public_mx=["192.0.2.25", "2001:db8::25"], domains=["good.mail.test"],
                     zones=["dnsbl.test"])
    code, report = _doctor(tmp_path, config, "dns.mx", "dns.rdns")
    assert code == 0, report
    checks = [(f["check"], f["level"]) for f in report["findings"]]
    assert checks == [("dns.mx", "ok"), ("dns.rdns", "ok"), ("dns.rdns", "ok")]
    mx = report["findings"][0]
    assert mx["evidence"] == [
        "MX 10 mx.mail.test -> 192.0.2.25: listener mx takes good.mail.test from anonymous clients",
        "MX 10 mx.mail.test -> 2001:db8::25: listener mx takes good.mail.test from anonymous clients"]
    assert report["findings"][2]["title"] == "2001:db8::25 has reverse DNS mx.mail.test, which resolves back to it"


def test_mx_pointing_elsewhere_or_at_refusing_listeners_fails(tmp_path, nsd_port):
    domains = ["topartner.mail.test", "wrong.mail.test", "mixed.mail.test", "tosub.mail.test",
               "implicit.mail.test", "absent.mail.test"]
    config = _config(nsd_port, public_mx=["192.0.2.25", "2001:db8::25"], domains=domains,
                     zones=["dnsbl.test"], public_sub=["192.0.2.26"], public_partner=["192.0.2.27"])
    # the partner listener takes only topartner.mail.test (domains[0]), and its MX reaches it
    code, report = _doctor(tmp_path, config, "dns.mx")
    assert code == 2
    [healthy] = _by_check(report, "dns.mx")
    assert healthy["level"] == "ok" and "topartner.mail.test" in healthy["title"]

    [wrong] = [f for f in _by_check(report, "dns.mx.elsewhere")]
    assert wrong["level"] == "fail" and "wrong.mail.test" in wrong["title"]
    assert wrong["evidence"] == ["MX 10 other.mail.test -> 203.0.113.9: not a public address of any listener"]
    assert "wrong.mail.test. IN MX 10 mx.mail.test.; mx.mail.test. IN A 192.0.2.25; " \
           "mx.mail.test. IN AAAA 2001:db8::25" in wrong["fix"]
    assert wrong["section"] == "scenario 3: MX points at the wrong server"
    domain_table = _line_of(config, '"wrong.mail.test"') - 1
    assert wrong["where"].endswith(f":{domain_table}")

    [mixed] = _by_check(report, "dns.mx.partly-elsewhere")
    assert mixed["level"] == "warn" and "mixed.mail.test" in mixed["title"]
    assert "other.mail.test (203.0.113.9)" in mixed["fix"]
    assert "remove the MX records that point elsewhere" in mixed["fix"]

    [tosub] = _by_check(report, "dns.mx.wrong-listener")
    assert "tosub.mail.test" in tosub["title"] and "listener submission" in tosub["title"]
    assert "anonymous = false" in " ".join(tosub["evidence"])
    anonymous_line = _line_of(config, "anonymous = false")
    assert tosub["where"].endswith(f":{anonymous_line}")
    assert "set anonymous = true on it (" in tosub["fix"] and f":{anonymous_line})" in tosub["fix"]

    [implicit] = _by_check(report, "dns.mx.implicit")
    assert implicit["level"] == "warn"
    assert "implicit.mail.test. IN MX 10 mx.mail.test." in implicit["fix"]
    assert implicit["evidence"][0].startswith("implicit MX")

    [absent] = _by_check(report, "dns.mx.missing")
    assert absent["level"] == "fail" and "absent.mail.test" in absent["title"]
    assert "NXDOMAIN" in " ".join(absent["evidence"])
    assert absent["fix"] == ("publish in the zone of absent.mail.test: absent.mail.test. IN MX 10 "
                             "mx.mail.test.; mx.mail.test. IN A 192.0.2.25; mx.mail.test. IN AAAA "
                             "2001:db8::25 (the public addresses of listener mx)")


def test_mx_at_listener_without_the_domain_in_accept_domains(tmp_path, nsd_port):
    # partner takes only good.mail.test; topartner.mail.test's MX reaches it
    config = _config(nsd_port, public_mx=["192.0.2.25", "2001:db8::25"],
                     domains=["good.mail.test", "topartner.mail.test"],
                     zones=["dnsbl.test"], public_partner=["192.0.2.27"])
    code, report = _doctor(tmp_path, config, "dns.mx")
    assert code == 2
    [ok] = _by_check(report, "dns.mx")
    assert "good.mail.test" in ok["title"]
    [bad] = _by_check(report, "dns.mx.wrong-listener")
    assert "listener partner" in bad["title"] and "topartner.mail.test" in bad["title"]
    line = _line_of(config, "accept_domains")
    assert bad["where"].endswith(f":{line}")
    assert 'add "topartner.mail.test" to accept_domains' in bad["fix"]
    assert "(event 1701)" in " ".join(bad["evidence"])


# --- reverse DNS -----------------------------------------------------------------------------

def test_reverse_dns_missing_unconfirmed_and_other_name(tmp_path, nsd_port):
    config = _config(nsd_port, public_mx=["192.0.2.25", "192.0.2.26", "192.0.2.27", "192.0.2.28"],
                     domains=["good.mail.test"], zones=["dnsbl.test"])
    code, report = _doctor(tmp_path, config, "dns.rdns")
    assert code == 2
    levels = [(f["check"], f["level"]) for f in report["findings"]]
    assert levels == [("dns.rdns", "ok"), ("dns.rdns.unconfirmed", "fail"),
                      ("dns.rdns.helo-mismatch", "warn"), ("dns.rdns.missing", "fail")]
    ok, liar, other, missing = report["findings"]
    assert "PTR of 192.0.2.26: liar.mail.test" in liar["evidence"]
    assert "liar.mail.test -> 203.0.113.9" in liar["evidence"]
    assert "26.2.0.192.in-addr.arpa. IN PTR mx.mail.test. and publish mx.mail.test. IN A 192.0.2.26" \
        in liar["fix"]

    hostname_line = _line_of(config, "hostname")
    assert other["title"] == "the reverse DNS name of 192.0.2.27 (smtp.mail.test) is not the EHLO name mx.mail.test"
    assert other["where"].endswith(f":{hostname_line}")
    assert other["fix"].startswith('set hostname = "smtp.mail.test" (')
    assert "27.2.0.192.in-addr.arpa. IN PTR mx.mail.test." in other["fix"]

    assert missing["title"] == "192.0.2.28 has no reverse DNS (PTR) record"
    assert "28.2.0.192.in-addr.arpa. IN PTR mx.mail.test. and publish mx.mail.test. IN A 192.0.2.28" in missing["fix"]
    assert missing["where"].endswith(f":{_line_of(config, 'public_addresses')}")


def test_dns_checks_skip_without_public_addresses(tmp_path, nsd_port):
    config = _config(nsd_port, public_mx=[], domains=["good.mail.test"], zones=["dnsbl.test"])
    code, report = _doctor(tmp_path, config, "dns.mx", "dns.rdns")
    assert code == 0
    assert [(f["check"], f["level"]) for f in report["findings"]] == [("dns.mx", "skip"), ("dns.rdns", "skip")]
    assert all("public_addresses" in f["fix"] for f in report["findings"])


# --- names and return codes (no DNS) ----------------------------------------------------------

def test_query_names_and_return_code_meanings():
    from relaywarden.diagnose.dnsbl import code_meaning, query_name, removal_page

    assert query_name("192.0.2.25", "zen.spamhaus.org") == "25.2.0.192.zen.spamhaus.org"
    assert query_name("2001:db8::1", "bl.test") == "1." + "0." * 23 + "8.b.d.0.1.0.0.2.bl.test"
    assert code_meaning("zen.spamhaus.org", "127.0.0.3").startswith("SBL CSS")
    assert code_meaning("zen.spamhaus.org", "127.0.0.9").startswith("DROP")
    assert code_meaning("pbl.spamhaus.org", "127.0.0.11").startswith("PBL (Policy Block List), listed by Spamhaus")
    assert code_meaning("zen.spamhaus.org", "127.255.255.255").startswith("query refused: the resolver sent more")
    assert code_meaning("bl.spamcop.net", "127.0.0.4") == \
        "listed (the list's own code; its TXT record and web site say why)"      # Spamhaus codes only for Spamhaus
    assert code_meaning("bl.example", "127.255.255.1").startswith("query refused")
    assert code_meaning("bl.example", "192.0.2.1").startswith("not a block list answer")
    assert removal_page("b.barracudacentral.org") == "https://www.barracudacentral.org/rbl/removal-request"
    assert removal_page("bl.spamcop.net").startswith("https://www.spamcop.net/")

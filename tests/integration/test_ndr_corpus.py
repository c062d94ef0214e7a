"""``ndr explain`` against real bounces: our reader and an independent analyser agree.

The corpus is ``../shared/corpus/bounces/`` beside the repository: 459 real messages from over a
hundred mail systems, a subset of the public ``sisimai/set-of-emails`` collection (commit 18e585c,
folder ``maildir/bsd``, BSD 2-clause licence, see its LICENSE). The reference is Debian's
``libsisimai-perl``, run once over every file.

Agreement, per message:

* Sisimai says "feedback" (an abuse report): we must say kind "abuse-report" and name no failed
  recipient. Sisimai says "vacation": we must say "auto-reply".
* Otherwise the set of failed recipients must be the same (addresses compared case-insensitively),
  and for each recipient the status must be the same where Sisimai has a real RFC 3463 code; where
  it has one of its own 5.0.9xx / 4.0.9xx stand-ins (the bounce carried no code), the class
  (2/4/5) must be the same.
* A message Sisimai reads nothing from has no reference: it is left out of the percentage, listed,
  and must still be read by us as a bounce (or a delivery report); anything else fails loudly.

At least 95% of the messages with a reference must agree, and every disagreement must be listed
in docs/ndr-explain.md with its reason.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from relaywarden.dsn.parse import BounceReport, parse_bounce

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT.parent / "shared" / "corpus" / "bounces"
DOCS = ROOT / "docs" / "ndr-explain.md"
REQUIRED = 0.95

_SISIMAI = r"""
use Sisimai;
for my $f (@ARGV) {
    print "== $f\n";
    my $r = eval { Sisimai->make($f) } || [];
    for (@$r) {
        print join("\t", $_->recipient->address, $_->deliverystatus, $_->reason), "\n";
    }
}
"""


def _have_sisimai() -> bool:
    if shutil.which("perl") is None:
        return False
    return subprocess.run(["perl", "-MSisimai", "-e", "1"], capture_output=True).returncode == 0


pytestmark = [
    pytest.mark.skipif(not CORPUS.is_dir(), reason=f"bounce corpus not found at {CORPUS}"),
    pytest.mark.skipif(not _have_sisimai(), reason="perl with Sisimai (Debian libsisimai-perl) not installed"),
]


@dataclass(frozen=True)
class Reference:
    recipients: dict[str, str]  # address -> status ("" for feedback and vacation)
    reasons: frozenset[str]


def _run_sisimai(files: list[Path]) -> dict[str, Reference]:
    out = subprocess.run(["perl", "-e", _SISIMAI, *map(str, files)], capture_output=True, text=True,
                         timeout=600, check=True).stdout
    refs: dict[str, tuple[dict[str, str], set[str]]] = {}
    current = ""
    for line in out.splitlines():
        if line.startswith("== "):
            current = Path(line[3:]).name
            refs[current] = ({}, set())
            continue
        address, status, reason = (line.split("\t") + ["", ""])[:3]
        refs[current][0][address.lower()] = status
        refs[current][1].add(reason)
    return {name: Reference(r, frozenset(reasons)) for name, (r, reasons) in refs.items()}


_STAND_IN = re.compile(r"^[245]\.0\.9\d\d$")


def agrees(ref: Reference, ours: BounceReport) -> bool:
    """The definition of agreement in the module docstring, for one message."""
    if ref.reasons and ref.reasons <= {"feedback"}:
        return ours.kind == "abuse-report" and not ours.recipients
    if ref.reasons and ref.reasons <= {"vacation"}:
        return ours.kind == "auto-reply" and not ours.recipients
    found = {r.address: r.status for r in ours.recipients}
    if set(found) != set(ref.recipients):
        return False
    for address, status in ref.recipients.items():
        if _STAND_IN.match(status):
            if found[address][0] != status[0]:
                return False
        elif found[address] != status:
            return False
    return True


def _show(ours: BounceReport) -> str:
    return f"{ours.kind}/{ours.format} " + (
        ", ".join(f"{r.address} {r.status}" for r in ours.recipients) or "(no recipient)")


def test_agreement_with_sisimai_on_the_corpus() -> None:
    files = sorted(CORPUS.glob("*.eml"))
    assert len(files) > 400, f"the corpus at {CORPUS} looks incomplete ({len(files)} files)"
    references = _run_sisimai(files)
    agreed, disagreed, unreferenced, unread = [], [], [], []
    for path in files:
        ours = parse_bounce(path.read_bytes())
        ref = references.get(path.name)
        if ref is None or not ref.recipients:
            unreferenced.append((path.name, ours))
            if ours.kind not in ("bounce", "delivery-report"):
                unread.append(path.name)
            continue
        if agrees(ref, ours):
            agreed.append(path.name)
        else:
            theirs = ", ".join(f"{a} {s or '-'}" for a, s in ref.recipients.items())
            disagreed.append((path.name, f"ours: {_show(ours)} | sisimai: {theirs} ({', '.join(sorted(ref.reasons))})"))

    print(f"\nagree {len(agreed)} / {len(agreed) + len(disagreed)} messages with a reference "
          f"({len(agreed) / (len(agreed) + len(disagreed)):.1%}); {len(unreferenced)} without one")
    for name, detail in disagreed:
        print(f"DISAGREE {name}: {detail}")
    for name, ours in unreferenced:
        print(f"NO REFERENCE {name}: {_show(ours)}")

    assert not unread, f"bounces we cannot read and Sisimai cannot either: {unread}"
    ratio = len(agreed) / (len(agreed) + len(disagreed))
    assert ratio >= REQUIRED, f"agreement {ratio:.1%} below {REQUIRED:.0%}; disagreements: {disagreed}"
    documented = DOCS.read_text(encoding="utf-8")
    undocumented = [name for name, _ in disagreed if name not in documented]
    assert not undocumented, f"disagreements not explained in {DOCS.name}: {undocumented}"


def test_abuse_reports_in_the_corpus_are_not_bounces() -> None:
    arf = sorted(CORPUS.glob("arf-*.eml"))
    assert arf
    kinds = {p.name: parse_bounce(p.read_bytes()).kind for p in arf}
    # arf-26 is a vacation auto-reply filed among them (Sisimai agrees); the rest are complaints.
    assert all(kind in ("abuse-report", "auto-reply") for kind in kinds.values()), kinds
    assert sum(kind == "abuse-report" for kind in kinds.values()) >= len(arf) - 1

"""The doctor's checks in the order of KB 895853, and the runner that gathers their findings.

Each module below exports ``CHECKS``: a list of (name, check) pairs.  A check that raises is
reported as a failure of its own (the doctor never hides a check that could not run).
"""

from __future__ import annotations

import asyncio
import importlib
import traceback

from .model import Check, Context, Finding, Level

MODULES = (
    "open_relay",      # the KB's first section: configuration audit + live battery
    "accounts",        # relay from a compromised account
    "queue_spam",      # spam in the queue
    "dnsbl",           # block lists
    "dns_checks",      # MX -> address -> listener (scenario 3), reverse DNS vs HELO
    "scenarios",       # scenarios 1, 2, 4, 5, 6
)


def all_checks() -> list[tuple[str, Check]]:
    checks: list[tuple[str, Check]] = []
    for name in MODULES:
        module = importlib.import_module(f"relaywarden.diagnose.{name}")
        checks.extend(module.CHECKS)
    return checks


def selected(name: str, only: set[str] | None) -> bool:
    """``--check dns`` runs dns.mx and dns.rdns, not dnsbl: names match whole dotted parts."""
    return not only or any(name == o or name.startswith(o.rstrip(".") + ".") for o in only)


async def run_checks(ctx: Context, only: set[str] | None = None) -> list[Finding]:
    findings: list[Finding] = []
    for name, check in all_checks():
        if not selected(name, only):
            continue
        try:
            findings.extend(await asyncio.wait_for(check(ctx), timeout=max(ctx.timeout * 6, 60)))
        except Exception as exc:
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            findings.append(Finding(name, Level.FAIL, f"the check {name} could not run", "doctor",
                                    (detail,), "report this as a bug with the evidence above"))
    return findings

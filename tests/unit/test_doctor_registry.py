"""Which checks `doctor --check NAME` runs: whole dotted parts, never a longer name's prefix."""

import pytest

from relaywarden.diagnose.registry import all_checks, selected

NAMES = [name for name, _ in all_checks()]


@pytest.mark.parametrize("only, expected", [
    ({"dns"}, {"dns.mx", "dns.rdns"}),
    ({"dnsbl"}, {"dnsbl"}),
    ({"open-relay"}, {"open-relay.config", "open-relay.live"}),
    ({"scenarios."}, {"scenarios.1", "scenarios.2", "scenarios.4", "scenarios.5", "scenarios.6"}),
    ({"scenarios.6", "accounts"}, {"scenarios.6", "accounts"}),
    ({"open"}, set()),
])
def test_check_selection(only, expected):
    assert {n for n in NAMES if selected(n, only)} == expected


def test_no_selection_runs_everything():
    assert all(selected(n, None) for n in NAMES) and len(NAMES) >= 12

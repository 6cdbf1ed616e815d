"""The pure rules of event delivery, and the event catalogue as the README documents it."""

from __future__ import annotations

import base64
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from konvert import errors
from konvert.events import rules
from konvert.events.openapi import EXAMPLES, WEBHOOKS
from konvert.ledger import events
from konvert.settings import load_settings

README = Path(__file__).resolve().parents[2] / "README.md"
SETTINGS = load_settings({})
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def test_retries_back_off_exponentially_with_jitter_up_to_the_maximum() -> None:
    rng = random.Random(7)
    delays = [rules.retry_delay_seconds(SETTINGS, attempt, rng) for attempt in range(1, 12)]

    bases = [min(5.0 * 4**n, 4 * 3600.0) for n in range(11)]
    assert all(base / 2 <= delay <= base for delay, base in zip(delays, bases, strict=True))
    assert len({round(d / b, 6) for d, b in zip(delays, bases, strict=True)}) > 1  # jittered


@given(st.randoms(use_true_random=False))
def test_a_message_is_retried_for_at_least_a_day_before_it_is_dead_lettered(rng: random.Random) -> None:
    first = now = NOW
    attempts = 1
    while (after := rules.after_failure(SETTINGS, attempts, first, now)).next_attempt_at is not None:
        assert after.next_attempt_at > now
        now = after.next_attempt_at
        attempts += 1

    assert now - first >= timedelta(days=1)
    assert now - first <= timedelta(days=1, hours=4)
    assert attempts < 20


def test_both_secrets_sign_during_the_grace_period_only() -> None:
    old, new = rules.new_secret(), rules.new_secret()
    during = rules.signed_headers(
        "evt_1", b"{}", rules.signing_secrets(new, old, NOW + timedelta(seconds=1), NOW), datetime.now(UTC)
    )
    after = rules.signed_headers("evt_1", b"{}", rules.signing_secrets(new, old, NOW, NOW), datetime.now(UTC))

    assert Webhook(old).verify(b"{}", during) == {} and Webhook(new).verify(b"{}", during) == {}
    assert Webhook(new).verify(b"{}", after) == {}
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(b"{}", after)


@given(st.integers(0, 2**63 - 1))
def test_a_feed_cursor_comes_back_as_the_position_it_was_made_from(position: int) -> None:
    assert rules.decode_cursor(rules.encode_cursor(position)) == position


@given(st.integers(0, 2**63), st.integers(0, 2**63 - 1))
def test_a_cursor_from_before_positions_names_the_event_it_points_past(xid: int, event_id: int) -> None:
    legacy = base64.urlsafe_b64encode(f"e{xid}.{event_id}".encode()).decode().rstrip("=")

    assert rules.decode_cursor(legacy) == rules.LegacyCursor(event_id)


@pytest.mark.parametrize(
    "cursor", ["", "x", "ZTEuLTI", "ZTEu", "ZS0xLjI", "e1.2", "p1", "cC0x", "cDkyMjMzNzIwMzY4NTQ3NzU4MDg"]
)
def test_a_cursor_konvert_did_not_make_is_refused(cursor: str) -> None:
    with pytest.raises(errors.ValidationFailed):
        rules.decode_cursor(cursor)


@pytest.mark.parametrize(
    ("positions", "after", "settled", "reached"),
    [
        ([], 5, 0, 5),
        ([6, 7, 8], 5, 0, 8),
        ([6, 8, 9], 5, 0, 6),  # 7 not visible yet: nothing past it
        ([7, 8], 5, 0, 5),
        ([7, 8], 5, 6, 8),  # 6 pruned, after both publishers read it
        ([7, 9], 5, 7, 7),  # 8 is past what they read
        ([10, 11], 5, 9, 11),
    ],
)
def test_readers_stop_at_the_first_position_missing_past_what_the_publishers_read(
    positions: list[int], after: int, settled: int, reached: int
) -> None:
    assert rules.contiguous(positions, after, settled) == reached


@given(st.lists(st.integers(1, 60), unique=True).map(sorted), st.integers(0, 60), st.integers(0, 60))
def test_no_position_missing_past_the_settled_ones_is_ever_passed(present: list[int], after: int, settled: int) -> None:
    positions = [p for p in present if p > after]
    reached = rules.contiguous(positions, after, settled)

    assert reached >= after
    assert all(n in present or n <= settled for n in range(after + 1, reached + 1))
    following = [p for p in positions if p > reached]
    # It stops only before a number missing past the settled ones.
    assert not following or (following[0] > reached + 1 and following[0] - 1 > settled)


def test_every_event_type_has_an_example_a_webhook_and_a_line_in_the_readme() -> None:
    readme = README.read_text("utf-8")
    encode = msgspec.json.Encoder().encode

    assert set(EXAMPLES) == set(events.CATALOGUE) == set(WEBHOOKS)
    for event_type, example in EXAMPLES.items():
        assert isinstance(example, events.CATALOGUE[event_type])
        line = f"| `{event_type}` |"
        assert line in readme, event_type
        documented = readme.split(line, 1)[1].split("\n", 1)[0]
        assert f"`{encode(example).decode().replace('|', chr(92) + '|')}`" in documented, event_type


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.2", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "non-public"),
    ],
)
def test_webhooks_never_go_to_addresses_inside_the_network(address: str, kind: str) -> None:
    reason = rules.address_refused(address)

    assert reason is not None and f" {kind} address" in reason


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:4700:4700::1111"])
def test_webhooks_go_to_public_addresses(address: str) -> None:
    assert rules.address_refused(address) is None


def test_an_endpoint_url_names_its_host_and_port() -> None:
    assert rules.destination("https://crm.example.com/hooks") == ("crm.example.com", 443, False)
    assert rules.destination("http://[::1]:8080/x") == ("::1", 8080, True)
    assert rules.destination("http://10.0.0.1/x") == ("10.0.0.1", 80, True)
    for url in ("ftp://example.com/x", "http:///nohost", "mailto:a@example.com"):
        with pytest.raises(ValueError):
            rules.destination(url)


@pytest.mark.parametrize("host", ["0" * 300, f"a.{'b' * 64}.com"])
def test_an_endpoint_url_whose_host_dns_cannot_carry_is_refused(host: str) -> None:
    # Found by schemathesis: such a host reached the resolver, whose UnicodeError answered 500.
    with pytest.raises(ValueError, match="DNS"):
        rules.destination(f"https://{host}/hooks")
    assert rules.destination("https://bücher.example/hooks").host == "bücher.example"

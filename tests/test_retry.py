"""proxy.retry: which failures are retried, how often, and how long to wait between tries."""

from __future__ import annotations

import random
from email.utils import formatdate

import pytest

from proxy.retry import MAX_BACKOFF_SECONDS, Retrying, parse_retry_after
from proxy.source_spec import RetryPolicy

DEFAULT_STATUSES = frozenset({429, 500, 502, 503, 504})

# --- from_policy ---------------------------------------------------------------------------


def test_no_policy_means_no_retry() -> None:
    retrying = Retrying.from_policy(None)
    assert retrying.max_retries == 0
    assert retrying.backoff_factor == 0.0
    assert retrying.status_forcelist == DEFAULT_STATUSES
    assert not retrying.retries_status(503, 0)
    assert not retrying.retries_transport_error(0)


def test_policy_without_forcelist_uses_the_default_statuses() -> None:
    retrying = Retrying.from_policy(RetryPolicy(max_retries=3))
    assert retrying.max_retries == 3
    assert retrying.backoff_factor == 0.0
    assert retrying.status_forcelist == DEFAULT_STATUSES


def test_policy_values_are_kept() -> None:
    policy = RetryPolicy(max_retries=2, backoff_factor=0.5, status_forcelist=[418, 503])
    assert Retrying.from_policy(policy) == Retrying(
        max_retries=2, backoff_factor=0.5, status_forcelist=frozenset({418, 503})
    )


def test_an_empty_forcelist_retries_no_status() -> None:
    retrying = Retrying.from_policy(RetryPolicy(max_retries=3, status_forcelist=[]))
    assert retrying.status_forcelist == frozenset()
    assert not any(retrying.retries_status(s, 0) for s in range(100, 600))
    assert retrying.retries_transport_error(0)


# --- retries_status / retries_transport_error ----------------------------------------------


@pytest.mark.parametrize("status", sorted(DEFAULT_STATUSES))
def test_listed_status_is_retried_up_to_max_retries(status: int) -> None:
    retrying = Retrying(max_retries=3)
    assert [retrying.retries_status(status, attempt) for attempt in range(6)] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]


def test_unlisted_statuses_are_never_retried() -> None:
    retrying = Retrying(max_retries=5)
    unlisted = [s for s in range(100, 600) if s not in DEFAULT_STATUSES]
    assert [s for s in unlisted if retrying.retries_status(s, 0)] == []


def test_other_4xx_are_never_retried() -> None:
    retrying = Retrying(max_retries=5)
    assert [s for s in range(400, 500) if retrying.retries_status(s, 0)] == [429]


def test_custom_forcelist_replaces_the_default() -> None:
    retrying = Retrying(max_retries=2, status_forcelist=frozenset({503}))
    assert retrying.retries_status(503, 0)
    assert not retrying.retries_status(500, 0)
    assert not retrying.retries_status(429, 0)


def test_zero_retries_never_retries() -> None:
    retrying = Retrying(max_retries=0)
    assert not retrying.retries_status(503, 0)
    assert not retrying.retries_transport_error(0)


def test_transport_errors_are_retried_up_to_max_retries() -> None:
    retrying = Retrying(max_retries=2)
    assert [retrying.retries_transport_error(a) for a in range(4)] == [True, True, False, False]


# --- backoff -------------------------------------------------------------------------------


def test_backoff_matches_equal_jitter_for_a_seeded_random() -> None:
    retrying = Retrying(max_retries=5, backoff_factor=0.5)
    for attempt in range(5):
        base = 0.5 * 2**attempt
        expected = base / 2 + random.Random(attempt).uniform(0, base / 2)
        assert retrying.backoff(attempt, random.Random(attempt)) == expected


@pytest.mark.parametrize("attempt", range(6))
def test_backoff_stays_within_equal_jitter_bounds(attempt: int) -> None:
    retrying = Retrying(max_retries=6, backoff_factor=0.25)
    base = 0.25 * 2**attempt
    rand = random.Random(1234)
    waits = [retrying.backoff(attempt, rand) for _ in range(200)]
    assert all(base / 2 <= w <= base for w in waits)
    # The random half is really used: the waits spread over the upper half of the range.
    assert min(waits) < base * 0.6
    assert max(waits) > base * 0.9


def test_backoff_grows_exponentially() -> None:
    retrying = Retrying(max_retries=4, backoff_factor=1.0)
    lows = [retrying.backoff(a, _Fixed(0.0)) for a in range(4)]
    highs = [retrying.backoff(a, _Fixed(1.0)) for a in range(4)]
    assert lows == [0.5, 1.0, 2.0, 4.0]
    assert highs == [1.0, 2.0, 4.0, 8.0]


def test_backoff_is_capped() -> None:
    retrying = Retrying(max_retries=10, backoff_factor=10.0)
    rand = random.Random(99)
    for attempt in range(2, 11):  # 10 * 2**2 = 40 already exceeds the cap
        waits = [retrying.backoff(attempt, rand) for _ in range(50)]
        assert all(MAX_BACKOFF_SECONDS / 2 <= w <= MAX_BACKOFF_SECONDS for w in waits)
    assert retrying.backoff(10, _Fixed(1.0)) == MAX_BACKOFF_SECONDS


def test_no_backoff_factor_means_no_wait() -> None:
    retrying = Retrying(max_retries=3)
    assert [retrying.backoff(a, random.Random(5)) for a in range(3)] == [0.0, 0.0, 0.0]


def test_backoff_without_a_random_stays_within_bounds() -> None:
    retrying = Retrying(max_retries=3, backoff_factor=0.2)
    waits = [retrying.backoff(1) for _ in range(100)]
    assert all(0.2 <= w <= 0.4 for w in waits)


class _Fixed(random.Random):
    """A Random whose ``uniform`` always lands at the same fraction of the range."""

    def __init__(self, fraction: float) -> None:
        super().__init__(0)
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction


# --- Retry-After, deadline, methods ----------------------------------------------------------

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 3 ", 3.0),
        (formatdate(NOW + 30, usegmt=True), 30.0),
        (formatdate(NOW - 30, usegmt=True), 0.0),
        ("soon", None),
        ("-5", None),
        (None, None),
    ],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, NOW) == seconds


def test_wait_is_the_longer_of_backoff_and_retry_after_within_the_deadline() -> None:
    retrying = Retrying(max_retries=3, backoff_factor=0.0)
    assert retrying.wait(0, 2.0, remaining=10.0) == 2.0
    assert retrying.wait(0, None, remaining=10.0) == 0.0
    assert retrying.wait(0, 20.0, remaining=10.0) is None


@pytest.mark.parametrize(
    ("method", "non_idempotent", "resend"),
    [
        ("GET", False, True),
        ("PUT", False, True),
        ("DELETE", False, True),
        ("POST", False, False),
        ("PATCH", False, False),
        ("POST", True, True),
    ],
)
def test_what_may_be_sent_twice(method: str, non_idempotent: bool, resend: bool) -> None:
    retrying = Retrying(max_retries=3, method=method, non_idempotent=non_idempotent)
    assert retrying.retries_status(503, 0) is resend
    assert retrying.retries_transport_error(0, sent=True) is resend
    assert retrying.retries_transport_error(0, sent=False)  # never reached: always safe

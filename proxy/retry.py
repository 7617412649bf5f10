"""When to retry an upstream call and how long to wait: pure decisions, no I/O."""

from __future__ import annotations

import random
from dataclasses import dataclass

from proxy.spec import DEFAULT_STATUS_FORCELIST, RetryPolicy

MAX_BACKOFF_SECONDS = 30.0
_RANDOM = random.Random()


@dataclass(frozen=True)
class Retrying:
    """A source's retry policy with its defaults filled in."""

    max_retries: int = 0
    backoff_factor: float = 0.0
    status_forcelist: frozenset[int] = frozenset(DEFAULT_STATUS_FORCELIST)

    @classmethod
    def from_policy(cls, policy: RetryPolicy | None) -> Retrying:
        if policy is None:
            return cls()
        statuses = policy.status_forcelist
        return cls(
            max_retries=policy.max_retries,
            backoff_factor=policy.backoff_factor or 0.0,
            status_forcelist=frozenset(DEFAULT_STATUS_FORCELIST if statuses is None else statuses),
        )

    def retries_status(self, status: int, attempt: int) -> bool:
        """Retry an HTTP answer only if its status is listed; other 4xx never."""
        return attempt < self.max_retries and status in self.status_forcelist

    def retries_transport_error(self, attempt: int) -> bool:
        """Timeouts and connection errors are always worth another attempt."""
        return attempt < self.max_retries

    def backoff(self, attempt: int, rand: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (0-based).

        Exponential (``factor * 2**attempt``) with "equal jitter": half fixed,
        half random, so sidecars retrying the same outage spread out.
        """
        base = min(self.backoff_factor * 2.0**attempt, MAX_BACKOFF_SECONDS)
        return base / 2 + (rand or _RANDOM).uniform(0, base / 2)

    def deadline(self, timeout: float) -> float:
        """The longest a fetch may take: every attempt's timeout plus every backoff at its longest."""
        backoffs = sum(
            min(self.backoff_factor * 2.0**i, MAX_BACKOFF_SECONDS) for i in range(self.max_retries)
        )
        return timeout * (self.max_retries + 1) + backoffs

"""When to retry an upstream call and how long to wait: pure decisions, no I/O."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

# One Retry-After parser for the broker and its workers: the client's (standard library only).
from proxy.client import parse_retry_after as parse_retry_after
from proxy.source_spec import DEFAULT_STATUS_FORCELIST, RetryPolicy

MAX_BACKOFF_SECONDS = 30.0
NON_IDEMPOTENT = frozenset({"POST", "PATCH"})
_RANDOM = random.Random()


@dataclass(frozen=True)
class Retrying:
    """A source's retry policy with its defaults filled in."""

    max_retries: int = 0
    backoff_factor: float = 0.0
    status_forcelist: frozenset[int] = frozenset(DEFAULT_STATUS_FORCELIST)
    method: str = "GET"
    non_idempotent: bool = False
    """Whether a POST/PATCH may be sent again after the upstream may have received it."""

    @classmethod
    def from_policy(cls, policy: RetryPolicy | None, method: str = "GET") -> Retrying:
        if policy is None:
            return cls(method=method)
        statuses = policy.status_forcelist
        return cls(
            max_retries=policy.max_retries,
            backoff_factor=policy.backoff_factor or 0.0,
            status_forcelist=frozenset(DEFAULT_STATUS_FORCELIST if statuses is None else statuses),
            method=method,
            non_idempotent=bool(policy.non_idempotent),
        )

    def in_force(self) -> dict[str, Any]:
        """The policy as the admin API shows it: the reference's fields, defaults filled in
        (``non_idempotent`` only when a source opted in)."""
        shown: dict[str, Any] = {
            "max_retries": self.max_retries,
            "backoff_factor": self.backoff_factor,
            "status_forcelist": sorted(self.status_forcelist),
        }
        if self.non_idempotent:
            shown["non_idempotent"] = True
        return shown

    def _may_resend(self) -> bool:
        # A POST the upstream received may have been acted on (and billed): sent twice, twice.
        return self.method not in NON_IDEMPOTENT or self.non_idempotent

    def retries_status(self, status: int, attempt: int) -> bool:
        """Retry an HTTP answer only if its status is listed; other 4xx never."""
        return attempt < self.max_retries and status in self.status_forcelist and self._may_resend()

    def retries_transport_error(self, attempt: int, sent: bool = True) -> bool:
        """Timeouts and connection errors are worth another attempt; once the request may
        have reached the upstream (``sent``), only for methods safe to send twice."""
        return attempt < self.max_retries and (not sent or self._may_resend())

    def wait(self, attempt: int, retry_after: float | None, remaining: float) -> float | None:
        """Seconds before attempt ``attempt + 1``: the backoff, or longer if the upstream asked;
        None when that would not leave the deadline room for another attempt."""
        delay = max(self.backoff(attempt), retry_after or 0.0)
        return delay if delay < remaining else None

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

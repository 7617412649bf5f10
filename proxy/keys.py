"""Cache keys and the Redis key layout: every key family the broker owns.

================================  ==========================  =====================  ==================
family                            value                       expiry                 owner
================================  ==========================  =====================  ==================
``{prefix}cache:{sid}:{key}``     a cache entry               TTL (+ stale_if_error)  proxy.cache
``{prefix}lock:{sid}:{key}``      a fetch in flight / failed  the fetch's deadline    proxy.singleflight
``{prefix}events:registry``       (pub/sub channel)           —                      proxy.source_registry
``{prefix}registry:changes``      source changes committed    never                  proxy.source_registry
                                  (INCR)
``{prefix}events:erasure``        (pub/sub channel)           —                      proxy.erasure
``{prefix}events:vendor``         (pub/sub channel)           —                      proxy.vendor_state
``{prefix}prune``                 the sidecar pruning now     the prune interval      proxy.pruner
``{prefix}spend:{sid}:{period}``  micro-units spent (INCRBY)  the period's end + 1 d  proxy.vendor_state
``{prefix}vendor:{sid}``          rate-limit TAT, breaker     2 days after last use   proxy.vendor_state
``{prefix}vendor:paused``         hash: sid → paused at       never (admin resumes)   proxy.vendor_state
``{prefix}vendor:holds``          hash: sid → held until      fields pruned on read   proxy.vendor_state
``{prefix}token:{sid}``           a source's OAuth2 token     before it expires       proxy.tokens
                                  (Fernet-encrypted)
``{prefix}lock:{sid}:token``      a token request in flight   its timeout             proxy.tokens
                                  / failed
================================  ==========================  =====================  ==================

Other families go beside ``cache:`` under the same prefix, never inside it, so
``--pattern '{prefix}cache:*'`` flushes cache entries only. On Redis Cluster
the source id is wrapped in a hash tag (``cache:{<sid>}:<key>``) so one
source's entries and locks share a slot: multi-key commands and per-source
flushes stay on one node.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from typing import Any

_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def make_cache_key(data_source_id: uuid.UUID | str, configured_params: dict[str, Any]) -> str:
    """The seed's ``make_cache_key``, byte for byte, so keys match the engine's.

    Uses the stdlib ``json.dumps`` on purpose: its separators and ASCII escaping
    are part of the hashed bytes.
    """
    content = {"data_source_id": str(data_source_id), "variables": configured_params}
    return hashlib.md5(_SEED_JSON.encode(content).encode("utf-8")).hexdigest()


# What ``json.dumps(content, sort_keys=True)`` builds on every call (only the default
# arguments share a cached encoder), built once: the same bytes, 3 µs less per request.
_SEED_JSON = json.JSONEncoder(sort_keys=True)


class KeyLayout:
    """Builds every Redis key from one prefix."""

    def __init__(self, prefix: str, cluster: bool = False) -> None:
        self.prefix = prefix
        self.cluster = cluster
        self.registry_channel = f"{prefix}events:registry"
        self.registry_changes = f"{prefix}registry:changes"
        self.erasure_channel = f"{prefix}events:erasure"
        self.vendor_channel = f"{prefix}events:vendor"
        self.cache_family = f"{prefix}cache:"
        self.prune_lock = f"{prefix}prune"
        self.paused = f"{prefix}vendor:paused"
        self.holds = f"{prefix}vendor:holds"

    def _source(self, data_source_id: uuid.UUID | str) -> str:
        return f"{{{data_source_id}}}" if self.cluster else str(data_source_id)

    def cache_entry(self, data_source_id: uuid.UUID | str, key: str) -> str:
        return f"{self.cache_family}{self._source(data_source_id)}:{key}"

    def lock(self, data_source_id: uuid.UUID | str, key: str) -> str:
        return f"{self.prefix}lock:{self._source(data_source_id)}:{key}"

    def spend(self, data_source_id: uuid.UUID | str, period: str) -> str:
        """What a source spent in one budget period (``proxy.vendor_guard.period_of``)."""
        return f"{self.prefix}spend:{self._source(data_source_id)}:{period}"

    def vendor(self, data_source_id: uuid.UUID | str) -> str:
        """A source's fleet-wide rate-limit and breaker state (one hash, the spend's slot)."""
        return f"{self.prefix}vendor:{self._source(data_source_id)}"

    def token(self, data_source_id: uuid.UUID | str) -> str:
        return f"{self.prefix}token:{self._source(data_source_id)}"

    def token_lock(self, data_source_id: uuid.UUID | str) -> str:
        """Beside the fetch locks, whose keys are md5 hex: never one of theirs."""
        return self.lock(data_source_id, "token")

    def cache_pattern(self, data_source_id: uuid.UUID | str | None = None) -> str:
        """A SCAN pattern for every cache entry, or for one source's entries.

        The prefix is a name, not a pattern: its glob characters are escaped, so a
        prefix like ``a?:`` never matches (and flushes) another prefix's keys.
        """
        source = (
            "*" if data_source_id is None else f"{_glob_escape(self._source(data_source_id))}:*"
        )
        return f"{_glob_escape(self.prefix)}cache:{source}"


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a Redis glob pattern (SCAN MATCH, KEYS)."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)

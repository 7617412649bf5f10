"""Spend and vendor protection, the Redis part: the fleet-wide state every sidecar shares.

Two kinds of state, read two ways:

- Pauses (an operator's) and holds (an upstream 429's ``Retry-After``) are two
  small hashes, ``{prefix}vendor:paused`` and ``{prefix}vendor:holds``, kept in
  memory by every sidecar, so checking them costs a miss nothing and a hit is
  never asked. The sidecar that sets one knows at once and announces it on
  ``{prefix}events:vendor``; every sidecar reads both hashes again when it hears
  that (``proxy.announcements``): a round trip later. A sidecar that missed the
  message reads them on resubscribing, or within ``SAFETY_INTERVAL`` (the only
  polling left: an idle sidecar asks Redis nothing else for them).
- Budgets, rate limits and breakers are decided at each upstream call by one
  Lua script (``ADMIT``) over the source's hash ``{prefix}vendor:{sid}`` and
  its spend counter ``{prefix}spend:{sid}:{period}``: one round trip, atomic,
  with Redis's clock for every sidecar. A call is reserved whole — its budget
  charged, its rate-limit turn taken, its probe slot counted — or refused with
  nothing changed, so concurrent calls can never overshoot a budget: spend
  never passes it. A breaker's outcome is reported by a second script
  (``SETTLE``) after the call, for sources that declare a breaker.

When Redis cannot be reached the checks let calls through (logged once per
outage), as the cache does: the broker keeps answering from the upstream.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from proxy.cache import RedisClient, reply_bytes
from proxy.errors import BrokerError, RateLimited, RedisUnavailable, SourcePaused, VendorRefusal
from proxy.keys import KeyLayout
from proxy.metrics import vendor_metrics
from proxy.outage import Outage
from proxy.source_spec import HTTPSource
from proxy.vendor_guard import (
    Admission,
    Plan,
    breaker_state,
    describe,
    is_vendor_failure,
    period_of,
)

if TYPE_CHECKING:
    from proxy.source_registry import Source

logger = logging.getLogger("databroker.vendors")

PROBE_LEASE_SLACK = 1.0
"""Seconds past a probe's longest fetch before its slot goes to another probe."""
PAUSED_RETRY_AFTER = 5.0
"""Retry-After of a paused source: an operator resumes it, nobody knows when."""
SAFETY_INTERVAL = 5.0
"""Seconds between two reads of the pauses and holds when no announcement came: how late
a sidecar sees a change whose announcement it lost without losing its subscription."""

# KEYS: the source's hash, its spend counter. ARGV: cost µ-units (0 = not counted),
# budget µ-units (-1 = none), the counter's TTL (s), rate-limit interval (µs, 0 = none),
# burst, the longest wait (µs), half-open probes (0 = no breaker), a probe's lease (µs),
# the breaker's window (µs).
# Reply: {verdict, µs (wait or retry after), spent, probe?, breaker state}.
# Checks first, writes last: a refused call changes nothing. A closed breaker counts the
# call in its window here, so that only failures (and probes) need reporting (SETTLE):
# a call that succeeds costs one round trip, not two.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local h = KEYS[1]
local probes = tonumber(ARGV[7])
local state = 'c'
local issued = 0
if probes > 0 then
  local f = redis.call('HMGET', h, 'bs', 'bu', 'bp')
  state = f[1] or 'c'
  local untl = tonumber(f[2] or '0')
  issued = tonumber(f[3] or '0')
  if state == 'o' then
    if now < untl then return {'CIRCUIT_OPEN', untl - now, 0, 0, 'o'} end
    state = 'h'
    issued = 0
  elseif state == 'h' and issued >= probes then
    if now < untl then return {'CIRCUIT_OPEN', untl - now, 0, 0, 'h'} end
    -- every probe's lease ran out unreported (their sidecars died): a new round
    issued = 0
  end
end
local cost = tonumber(ARGV[1])
local budget = tonumber(ARGV[2])
local spent = 0
if budget >= 0 then
  spent = tonumber(redis.call('GET', KEYS[2]) or '0')
  if spent + cost > budget then return {'BUDGET_EXHAUSTED', 0, spent, 0, state} end
end
local interval = tonumber(ARGV[4])
local wait = 0
if interval > 0 then
  local tat = tonumber(redis.call('HGET', h, 'rt') or '0')
  if tat < now then tat = now end
  wait = tat + interval - interval * tonumber(ARGV[5]) - now
  if wait < 0 then wait = 0 end
  if wait > tonumber(ARGV[6]) then return {'RATE_LIMITED', wait, spent, 0, state} end
  redis.call('HSET', h, 'rt', tat + interval)
end
if budget >= 0 then
  spent = redis.call('INCRBY', KEYS[2], cost)
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
local probe = 0
if state == 'h' then
  probe = 1
  redis.call('HSET', h, 'bs', 'h', 'bp', issued + 1, 'bu', now + wait + tonumber(ARGV[8]))
elseif probes > 0 then
  local ws = tonumber(redis.call('HGET', h, 'ws') or '0')
  if now - ws >= tonumber(ARGV[9]) then
    redis.call('HSET', h, 'ws', now, 'wc', 1, 'wf', 0)
  else
    redis.call('HINCRBY', h, 'wc', 1)
  end
end
redis.call('EXPIRE', h, 172800)
return {'OK', wait, spent, probe, state}
"""

# KEYS: the source's hash. ARGV: failed (0/1), probe (0/1), failure ratio, min requests,
# window (µs), open (µs). Reply: the breaker's state after this outcome.
# A probe's outcome decides a half-open breaker: a success closes it, a failure opens it
# again. Otherwise only failures are reported: one counts in the closed breaker's window
# (whose calls ADMIT counted), and opens it at the ratio. Failures of calls admitted
# before the breaker opened are not counted again.
SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local h = KEYS[1]
local failed = ARGV[1] == '1'
local state = redis.call('HGET', h, 'bs') or 'c'
if ARGV[2] == '1' then
  if state ~= 'h' then return state end
  if failed then
    redis.call('HSET', h, 'bs', 'o', 'bu', now + tonumber(ARGV[6]), 'bp', 0)
    return 'o'
  end
  redis.call('HSET', h, 'bs', 'c', 'ws', now, 'wc', 0, 'wf', 0, 'bp', 0)
  return 'c'
end
if state ~= 'c' or not failed then return state end
local f = redis.call('HMGET', h, 'ws', 'wc', 'wf')
local ws, wc, wf = tonumber(f[1] or '0'), tonumber(f[2] or '0'), tonumber(f[3] or '0')
-- the window rolled while the call was out: it counts as the new window's first call
if now - ws >= tonumber(ARGV[5]) then ws, wc, wf = now, 1, 0 end
wf = wf + 1
if wc >= tonumber(ARGV[4]) and wf >= tonumber(ARGV[3]) * wc then
  redis.call('HSET', h, 'bs', 'o', 'bu', now + tonumber(ARGV[6]), 'bp', 0, 'ws', now, 'wc', 0, 'wf', 0)
  return 'o'
end
redis.call('HSET', h, 'ws', ws, 'wc', wc, 'wf', wf)
return 'c'
"""


class VendorState:
    """This sidecar's view of the fleet's pauses and holds, and the scripts' runner."""

    def __init__(self, redis: RedisClient, layout: KeyLayout) -> None:
        self._redis = redis
        self._layout = layout
        self._admit = redis.register_script(ADMIT)
        self._settle = redis.register_script(SETTLE)
        self.paused: frozenset[uuid.UUID] = frozenset()
        self.holds: dict[uuid.UUID, float] = {}
        """Source → when its hold ends (epoch seconds)."""
        self._outage = Outage(
            logger,
            "vendor state unavailable in Redis (%s); calls are let through unchecked",
            "vendor state reachable again in Redis",
        )

    async def before_call(self, source: Source, timeout: float) -> Admission | None:
        """Let one upstream call of ``source`` go, once it is its turn, or raise the refusal.

        None for a source without a budget, rate limit or breaker: nothing to report.
        Its caller waits ``timeout`` at most for a rate-limit turn.
        """
        self.check_local(source.data_source_id, source.name, time.time())
        http = source.http
        admission = None
        if http.budget is not None or http.rate_limit is not None or http.circuit_breaker:
            # A probe's slot is freed by its outcome, or after the longest its fetch can take.
            lease = source.retrying.deadline(timeout) + PROBE_LEASE_SLACK
            admission = await self.admit(
                source.data_source_id, source.name, Plan.of(http), timeout, lease
            )
            if admission.wait > 0:
                await asyncio.sleep(admission.wait)
        if http.cost is not None:
            vendor_metrics(source.name).spend(http.cost.currency).inc(float(http.cost.amount))
        return admission

    async def after_call(
        self, source: Source, admission: Admission | None, error: BrokerError | None
    ) -> None:
        """Report how the call went to the source's breaker: failures and probes (the
        admit script counted the call already). (An upstream 429's hold was set as it came.)"""
        if admission is None or source.http.circuit_breaker is None:
            return
        failed = is_vendor_failure(error)
        if failed or admission.probe:
            plan = Plan.of(source.http)
            await self.settle(source.data_source_id, source.name, plan, admission, failed)

    def check_local(self, data_source_id: uuid.UUID, name: str, now: float) -> None:
        """Raise if the fleet paused or holds the source (what the last read said)."""
        if data_source_id in self.paused:
            raise _counted(
                name,
                SourcePaused(
                    "paused by an operator; resume it to call the upstream", PAUSED_RETRY_AFTER
                ),
            )
        until = self.holds.get(data_source_id)
        if until is not None and now < until:
            raise _counted(
                name,
                RateLimited(
                    "the upstream asked to be left alone (HTTP 429); not called", until - now
                ),
            )

    async def admit(
        self, data_source_id: uuid.UUID, name: str, plan: Plan, max_wait: float, lease: float
    ) -> Admission:
        """Reserve one upstream call fleet-wide, or raise the refusal."""
        now = time.time()
        period, args = plan.admit_args(now, max_wait, lease)
        keys = [self._layout.vendor(data_source_id), self._layout.spend(data_source_id, period)]
        try:
            reply = await self._admit(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            self._outage.failed(type(exc).__name__)
            return Admission()
        self._outage.recovered()
        decided = plan.decide(reply, now)
        metrics = vendor_metrics(name)
        if plan.budget is not None and reply[0] in (b"OK", b"BUDGET_EXHAUSTED"):
            remaining = plan.remaining(int(reply[2])) or 0.0
            metrics.budget_remaining(plan.budget.currency).set(max(remaining, 0.0))
        if plan.breaker is not None:
            metrics.breaker.set(breaker_state(reply[4]))
        if isinstance(decided, VendorRefusal):
            raise _counted(name, decided)
        if decided.wait > 0:
            metrics.waits.inc()
            metrics.wait_seconds.inc(decided.wait)
        return decided

    async def settle(
        self, data_source_id: uuid.UUID, name: str, plan: Plan, admission: Admission, failed: bool
    ) -> None:
        """Report a breaker-guarded call's outcome."""
        try:
            state = await self._settle(
                keys=[self._layout.vendor(data_source_id)],
                args=plan.settle_args(failed, admission.probe),
            )
        except (RedisError, OSError) as exc:
            self._outage.failed(type(exc).__name__)
            return
        vendor_metrics(name).breaker.set(breaker_state(state))

    async def hold(self, data_source_id: uuid.UUID, seconds: float) -> None:
        """Keep the whole fleet from calling the source for ``seconds`` (an upstream 429)."""
        until = time.time() + seconds
        self.holds = {**self.holds, data_source_id: until}
        try:
            await self._redis.hset(self._layout.holds, str(data_source_id), repr(until))
        except (RedisError, OSError) as exc:
            self._outage.failed(type(exc).__name__)
            return
        await self._announce(data_source_id)

    async def set_paused(self, data_source_id: uuid.UUID, paused: bool) -> None:
        """Pause or resume the source fleet-wide; RedisUnavailable if Redis did not take it."""
        try:
            if paused:
                await self._redis.hset(self._layout.paused, str(data_source_id), repr(time.time()))
            else:
                await self._redis.hdel(self._layout.paused, str(data_source_id))
        except (RedisError, OSError) as exc:
            raise RedisUnavailable(f"Redis did not answer ({type(exc).__name__}); retry") from exc
        self.paused = self.paused | {data_source_id} if paused else self.paused - {data_source_id}
        await self._announce(data_source_id)

    async def _announce(self, data_source_id: uuid.UUID) -> None:
        """Tell every sidecar to read the pauses and holds again. Never raises: the change
        is in Redis, and a sidecar that does not hear of it reads it within SAFETY_INTERVAL."""
        try:
            await self._redis.publish(self._layout.vendor_channel, str(data_source_id))
        except (RedisError, OSError, AttributeError) as exc:
            # AttributeError: redis-py 5.0's asyncio cluster client has no publish; the
            # others read the change within SAFETY_INTERVAL all the same.
            logger.warning("could not announce a vendor state change (%s)", type(exc).__name__)

    async def describe(self, data_source_id: uuid.UUID, http: HTTPSource) -> dict[str, Any]:
        """The source's protection as the fleet holds it now (``vendor_guard.describe``)."""
        plan, now, sid = Plan.of(http), time.time(), str(data_source_id)
        period = period_of(plan.budget.period, now)[0] if plan.budget else "none"
        try:
            async with self._redis.pipeline(transaction=False) as pipeline:
                pipeline.hexists(self._layout.paused, sid)
                pipeline.hget(self._layout.holds, sid)
                pipeline.hmget(self._layout.vendor(data_source_id), ["bs", "bu"])
                pipeline.get(self._layout.spend(data_source_id, period))
                paused, held, breaker, spent = await pipeline.execute()
        except (RedisError, OSError) as exc:
            raise RedisUnavailable(f"Redis did not answer ({type(exc).__name__}); retry") from exc
        return describe(
            plan,
            paused=bool(paused),
            held_until=None if held is None else float(held),
            breaker=(breaker[0], breaker[1]),
            spent_micros=int(spent or 0),
            now=now,
        )

    async def refresh(self) -> None:
        """Read the fleet's pauses and holds; drop holds that ended."""
        async with self._redis.pipeline(transaction=False) as pipeline:
            pipeline.hkeys(self._layout.paused)
            pipeline.hgetall(self._layout.holds)
            paused, holds = await pipeline.execute()
        now = time.time()
        self.paused = frozenset(uuid.UUID(reply_bytes(sid).decode()) for sid in paused)
        live = {uuid.UUID(reply_bytes(sid).decode()): float(until) for sid, until in holds.items()}
        ended = [str(sid) for sid, until in live.items() if until <= now]
        self.holds = {sid: until for sid, until in live.items() if until > now}
        if ended:
            # Race window: a hold set again meanwhile is deleted here; its sidecar keeps
            # it locally, and the upstream's next 429 sets it again.
            await self._redis.hdel(self._layout.holds, *ended)

    async def resync(self) -> None:
        """``refresh``, through any Redis outage (logged once): what an announcement, a
        resubscription or the safety timer runs (``proxy.announcements``)."""
        try:
            await self.refresh()
        except (RedisError, OSError, ValueError) as exc:
            self._outage.failed(type(exc).__name__)
        else:
            self._outage.recovered()


def _counted(name: str, refusal: VendorRefusal) -> VendorRefusal:
    vendor_metrics(name).refusals(refusal.code).inc()
    return refusal

"""The benchmark's pure half: wrk scripts and output, medians, ratios, the table,
invalidation latency, profiles.

No I/O here: ``bench.run`` runs the servers and wrk and hands the text over;
tests/test_bench.py checks these functions on canned output.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

TARGETS = ("ceiling", "hits", "hits_redis", "direct", "misses")
"""Run order within a round: each measured target sits next to its reference.

``hits`` is the broker as shipped (hot entries on); ``hits_redis`` the same
broker with hot entries off, so every hit is a Redis GET like the ceiling's."""
HIT_TARGETS = ("hits", "hits_redis")

CONCURRENCY = (1, 16, 64)
MARK = "@@bench "
STOPPED = "@@stopped"


@dataclass(frozen=True, slots=True)
class WrkRun:
    """One wrk run, from the line its ``done`` hook prints."""

    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    """Socket errors (connect, read, write, timeout) and HTTP statuses above 399."""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass(frozen=True, slots=True)
class Summary:
    """The median of a target's runs at one concurrency."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    runs: int


def lua_script(bodies: Sequence[bytes], *, limit: int | None = None) -> str:
    """A wrk script POSTing ``bodies`` (in turn when several) and printing one result line.

    With ``limit``, each wrk thread stops after that many responses and says so
    on stdout: wrk's own clock only knows durations, so the caller interrupts it
    once every thread has stopped.
    """
    if not bodies:
        raise ValueError("a wrk script needs at least one body")
    lines = ['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"']
    if len(bodies) == 1:
        lines.append(f"wrk.body = {_lua_string(bodies[0])}")
    else:
        lines += [
            "local bodies = {" + ", ".join(_lua_string(b) for b in bodies) + "}",
            "local prepared = {}",
            "local next_request = 0",
            "init = function(args)",
            "  for i, body in ipairs(bodies) do prepared[i] = wrk.format(nil, nil, nil, body) end",
            "end",
            "request = function()",
            "  next_request = next_request % #prepared + 1",
            "  return prepared[next_request]",
            "end",
        ]
    if limit is not None:
        lines += [
            "local answered = 0",
            "response = function(status, headers, body)",
            "  answered = answered + 1",
            f"  if answered == {int(limit)} then",
            f'    io.write("{STOPPED}\\n"); io.flush(); wrk.thread:stop()',
            "  end",
            "end",
        ]
    result = (
        '{"requests":%d,"duration_us":%d,"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,'
        '"max_us":%.0f,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}'
    )
    lines += [
        "done = function(summary, latency, requests)",
        "  local e = summary.errors",
        f"  io.write(string.format('{MARK}{result}\\n',",
        "    summary.requests, summary.duration,",
        "    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,",
        "    e.connect, e.read, e.write, e.status, e.timeout))",
        "end",
    ]
    return "\n".join(lines) + "\n"


def _lua_string(data: bytes) -> str:
    """A Lua long string holding ``data`` verbatim (JSON bodies never contain its closing)."""
    text = data.decode()
    if "]==]" in text or "\n" in text:
        raise ValueError("body cannot be embedded in a Lua long string")
    return f"[==[{text}]==]"


def parse_wrk(output: str) -> WrkRun:
    """The result line our ``done`` hook printed; wrk's own report is for humans."""
    for line in output.splitlines():
        if line.startswith(MARK):
            f = orjson.loads(line[len(MARK) :])
            return WrkRun(
                requests=f["requests"],
                seconds=f["duration_us"] / 1e6,
                p50_ms=f["p50_us"] / 1000,
                p90_ms=f["p90_us"] / 1000,
                p99_ms=f["p99_us"] / 1000,
                max_ms=f["max_us"] / 1000,
                errors=sum(f[k] for k in ("connect", "read", "write", "status", "timeout")),
            )
    raise ValueError(f"no {MARK.strip()} line in wrk's output:\n{output}")


def summarize(runs: Sequence[WrkRun]) -> Summary:
    if not runs:
        raise ValueError("no runs to summarize")
    return Summary(
        rps=statistics.median(r.rps for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        errors=sum(r.errors for r in runs),
        runs=len(runs),
    )


# The targets, so the table can say which ratios pass.
HIT_THROUGHPUT_TARGET = 0.85
HIT_P99_TARGET = 1.5
MISS_OVERHEAD_TARGET_MS = 1.0
WRITER_TARGET = 20_000
MEMORY_GROWTH_TARGET = 1.10
# A sidecar's footprint, multiplied by the fleet (issue 13, item 9).
IDLE_RSS_TARGET_MIB = 60
LOADED_RSS_TARGET_MIB = 80
START_TO_READY_TARGET_SECONDS = 1.0
INVALIDATION_TARGET_MS = 50.0
"""A change made elsewhere is seen by the broker's next read within this (hot entries)."""


Table = Mapping[tuple[str, int], Summary]


def ratios(table: Table) -> dict[str, dict[int, float]]:
    """The issue's ratios at every concurrency both sides were measured at."""
    out: dict[str, dict[int, float]] = {}
    for hit in HIT_TARGETS:
        out[f"{hit}_rps_over_ceiling"] = {}
        out[f"{hit}_p99_over_ceiling"] = {}
    out["misses_p50_minus_direct_ms"] = {}
    for c in sorted({c for _, c in table}):
        ceiling = table.get(("ceiling", c))
        for hit in HIT_TARGETS:
            hits = table.get((hit, c))
            if hits and ceiling and ceiling.rps:
                out[f"{hit}_rps_over_ceiling"][c] = hits.rps / ceiling.rps
            if hits and ceiling and ceiling.p99_ms:
                out[f"{hit}_p99_over_ceiling"][c] = hits.p99_ms / ceiling.p99_ms
        misses, direct = table.get(("misses", c)), table.get(("direct", c))
        if misses and direct:
            out["misses_p50_minus_direct_ms"][c] = misses.p50_ms - direct.p50_ms
    return out


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def format_table(table: Table, ratio: Mapping[str, Mapping[int, float]]) -> str:
    """The results as aligned text, then each ratio against its target."""
    rows = [f"{'target':<10} {'c':>3} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"]
    for c in sorted({c for _, c in table}):
        for target in TARGETS:
            s = table.get((target, c))
            if s is not None:
                rows.append(
                    f"{target:<10} {c:>3} {s.rps:>9.0f} {s.p50_ms:>8.2f} {s.p99_ms:>8.2f} {s.errors:>6}"
                )
    rows.append("")
    for hit in HIT_TARGETS:
        rps, p99 = (
            ratio.get(f"{hit}_rps_over_ceiling", {}),
            ratio.get(f"{hit}_p99_over_ceiling", {}),
        )
        if rps:
            rows.append(
                f"{hit} / ceiling req/s (target >= {HIT_THROUGHPUT_TARGET}): "
                + "  ".join(
                    f"c={c} {v:.2f} {verdict(v >= HIT_THROUGHPUT_TARGET)}" for c, v in rps.items()
                )
            )
        if 16 in p99:
            rows.append(
                f"{hit} p99 / ceiling p99 at c=16 (target <= {HIT_P99_TARGET}): "
                f"{p99[16]:.2f} {verdict(p99[16] <= HIT_P99_TARGET)}"
            )
    gap = ratio.get("misses_p50_minus_direct_ms", {})
    if gap:
        rows.append(
            f"misses p50 - direct p50 (target <= {MISS_OVERHEAD_TARGET_MS:g} ms): "
            + "  ".join(
                f"c={c} {v:+.2f} ms {verdict(v <= MISS_OVERHEAD_TARGET_MS)}" for c, v in gap.items()
            )
        )
    return "\n".join(rows)


@dataclass(frozen=True, slots=True)
class Latencies:
    """Write elsewhere → the broker's next read sees it, over several rounds."""

    rounds: int
    p50_ms: float
    max_ms: float
    over_target: int
    stale_reads: int
    """Answers that still carried the old entry after the write (hot copies not yet dropped)."""


def summarize_latencies(seconds: Sequence[float], stale_reads: int) -> Latencies:
    if not seconds:
        raise ValueError("no latencies to summarize")
    ms = [s * 1000 for s in seconds]
    return Latencies(
        rounds=len(ms),
        p50_ms=statistics.median(ms),
        max_ms=max(ms),
        over_target=sum(1 for m in ms if m > INVALIDATION_TARGET_MS),
        stale_reads=stale_reads,
    )


def format_latencies(latencies: Latencies) -> str:
    return (
        f"invalidation: a write elsewhere seen by the next read in p50 {latencies.p50_ms:.2f} ms, "
        f"max {latencies.max_ms:.2f} ms over {latencies.rounds} rounds, "
        f"{latencies.stale_reads} stale answers (target <= {INVALIDATION_TARGET_MS:g} ms: "
        f"{verdict(latencies.over_target == 0)})"
    )


def format_footprint(marks: Mapping[str, Any]) -> list[str]:
    """The ``--memory`` case's lines, each figure against its target: start to ready,
    idle RSS, RSS after the first tenth of the requests and after all of them (held to the
    loaded target both), and the growth between the two."""
    ready = marks["start_to_ready_seconds"]
    idle = marks["rss_kib_idle"] / 1024
    lines = [
        f"footprint: start to ready {ready:.2f} s "
        f"(target <= {START_TO_READY_TARGET_SECONDS:g}: "
        f"{verdict(ready <= START_TO_READY_TARGET_SECONDS)})",
        f"footprint: idle RSS {idle:.1f} MiB "
        f"(target <= {IDLE_RSS_TARGET_MIB}: {verdict(idle <= IDLE_RSS_TARGET_MIB)})",
    ]
    total = marks["requests"]
    for label, count in (("after_first", total // 10), ("after_all", total)):
        mib = marks[f"rss_kib_{label}"] / 1024
        lines.append(
            f"footprint: RSS {mib:.1f} MiB after {count} mixed requests "
            f"(target <= {LOADED_RSS_TARGET_MIB}: {verdict(mib <= LOADED_RSS_TARGET_MIB)})"
        )
    growth = marks["rss_kib_after_all"] / marks["rss_kib_after_first"]
    lines.append(
        f"footprint: growth from {total // 10} to {total} requests x{growth:.3f} "
        f"(target <= {MEMORY_GROWTH_TARGET}: {verdict(growth <= MEMORY_GROWTH_TARGET)})"
    )
    return lines


def rss_kib(status: str) -> int:
    """VmRSS from the text of ``/proc/<pid>/status``, in KiB."""
    match = re.search(r"^VmRSS:\s+(\d+)\s+kB$", status, re.MULTILINE)
    if match is None:
        raise ValueError("no VmRSS line")
    return int(match.group(1))


_LINE_NUMBER = re.compile(r":\d+\)$")
_FILE = re.compile(r"\((.*)\)$")


@dataclass(frozen=True, slots=True)
class Profile:
    """py-spy samples folded by function, as shares (%) of the CPU samples.

    ``inclusive`` covers our own code only (``proxy/``): everything else is either
    the process's root chain (in every stack) or shown by its self time.
    """

    samples: int
    self_time: list[tuple[str, float]]
    inclusive: list[tuple[str, float]]
    modules: list[tuple[str, float]]


def fold_profile(collapsed: str, top: int = 15) -> Profile:
    """Fold py-spy's ``--format raw`` output: ``frame;frame;… count`` per line, root first."""
    own: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    module: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_LINE_NUMBER.sub(")", f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        found = _FILE.search(frames[-1])
        module[found.group(1) if found else frames[-1]] += count
        for frame in set(frames):
            if "(proxy/" in frame:
                ours[frame] += count

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, 100 * c / total) for name, c in counter.most_common(top)]

    return Profile(total, shares(own), shares(ours), shares(module))


def format_profile(profile: Profile, cpu_us_per_request: float | None = None) -> str:
    """The three lists; with the CPU time a request cost, each share in µs per request too."""
    head = f"{profile.samples} samples (CPU only, idle excluded)"
    if cpu_us_per_request is not None:
        head += f", {cpu_us_per_request:.0f} µs of CPU per request"
    out = [head]
    for title, rows in (
        ("self time by function", profile.self_time),
        ("inclusive time, our code", profile.inclusive),
        ("self time by module", profile.modules),
    ):
        out.append(f"-- {title}")
        for name, share in rows:
            cost = (
                "" if cpu_us_per_request is None else f" {share * cpu_us_per_request / 100:6.1f} µs"
            )
            out.append(f"{share:6.1f}%{cost}  {name}")
    return "\n".join(out)

"""``python -m bench.metrics``: what metrics cost a broker request, in µs.

Per request the route does ``proxy.metrics.record_request`` (a counter and a
histogram, children cached); before the second release it did one counter. Both
are timed in memory (one worker) and in prometheus-client's multiprocess mode
(``serve --workers N``: memory-mapped files), each mode in a process of its own,
as the library picks its value store at import.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import timeit

CALLS = 200_000


def _measure() -> None:
    from proxy.metrics import BROKER_REQUESTS, record_request

    counter = BROKER_REQUESTS.labels(source="bench", origin="CACHE", code="OK")
    counter_only = timeit.timeit(counter.inc, number=CALLS) / CALLS * 1e6
    recorded = (
        timeit.timeit(lambda: record_request("bench", "CACHE", "OK", 0.0003), number=CALLS)
        / CALLS
        * 1e6
    )
    mode = "multiprocess" if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else "in memory"
    print(f"{mode:>12}: counter only {counter_only:.2f} µs, record_request {recorded:.2f} µs")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        _measure()
        return
    subprocess.run([sys.executable, "-m", "bench.metrics", "--measure"], check=True)
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as shared:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": shared}
        subprocess.run([sys.executable, "-m", "bench.metrics", "--measure"], check=True, env=env)


if __name__ == "__main__":
    main()

"""The benchmark: ``python -m bench`` (``make bench``). Not shipped: the wheel holds ``proxy`` only.

- ``run``: starts the broker and its references, drives them with wrk, times the
  outbox writer and invalidation, writes the report.
- ``stats``: the pure half (wrk scripts and output, medians, ratios, the table,
  profiles), tested by ``tests/test_bench.py``.
- ``apps``: the reference apps (upstream, ceiling, direct).

Ports, the private database and Redis prefix, processes and source registration
are the tests' own helpers (``tests/harness.py``).
"""

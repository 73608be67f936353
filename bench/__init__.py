"""The benchmark suite of slack_fathom_db: ``python -m bench`` (or ``make bench``).

Four implementations of the same work (the layer, raw asyncpg, the
synchronous ORM design it replaces, a naive async ORM) on databases it
creates and loads itself; see :mod:`bench.cli` for the steps and
``docs/benchmarks.md`` for the last full run.
"""

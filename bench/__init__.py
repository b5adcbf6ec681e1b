"""Benchmarks of cdc: `python -m bench.run [--quick] [--only NAME,...] [--flavor embedded|system]`.

Every measurement starts its own throwaway PostgreSQL server (``cdc.devdb.LocalPostgres``),
runs `cdc setup` / `cdc run` as real subprocesses, and cleans up in ``finally``. The figures
go to ``bench/out/results.json`` and ``docs/benchmarks.md``.
"""

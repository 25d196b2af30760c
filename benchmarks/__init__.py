"""pllava-fast's benchmarks: one script per stage (``python -m benchmarks.<name>``, results JSON
under ``benchmarks/results/``), pytest-benchmark suites (``pytest benchmarks --benchmark-only``)
and the end-to-end comparison (``python -m benchmarks.e2e``), all on ``harness``."""

"""pytest-benchmark suites per stage. Run: ``pytest benchmarks/ --benchmark-only``.

Each suite benchmarks the baseline (original order / original preprocessing) and pllava-fast in
the same session, grouped so pytest-benchmark prints them side by side.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

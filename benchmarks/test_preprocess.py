"""pytest-benchmark: 16 decoded 720p frames -> model input, PLLaVA's PIL path vs the op.

    pytest benchmarks/test_preprocess.py --benchmark-only [--benchmark-group-by=group]

Cases and baselines as in bench_preprocess.py (which writes the results JSON).
"""
import pytest
import torch

from .bench_preprocess import make_cases
from .harness import bench

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def cases(request):
    return request.param, make_cases(16, request.param)


@pytest.mark.parametrize("start", ["from_rgb", "from_yuv"])
@pytest.mark.parametrize("impl", ["baseline", "ours"])
def test_frames_preprocess(benchmark, cases, start, impl):
    device, all_cases = cases
    base, ours, _ = all_cases[start]
    fn = base if impl == "baseline" else ours
    benchmark.group = f"frames_preprocess-{start}-{device}"
    bench(benchmark, fn, device=device)

"""pytest-benchmark: projector stage (original order vs fused pool fast path) and the pooling op
alone (GELU + AdaptiveAvgPool3d + rearranges vs ``pool_visual_tokens``), at PLLaVA-7B shape.

    pytest benchmarks/test_pooling.py --benchmark-only
"""
import pytest
import torch

from pllava_fast import ops
from pllava_fast.devices import default_device
from pllava_fast.kernels.pooling import pool_visual_tokens_ref

from .bench_pooling import (FRAMES, FRAME_SHAPE, POOLING_SHAPE, default_dtype, make_projector,
                            projector_fast, projector_original)
from .harness import bench

DEVICE = default_device()
DTYPE = default_dtype(DEVICE)
# the CPU runs are seconds each: a few rounds; GPU runs are milliseconds
ROUNDS = 20 if DEVICE == "cuda" else 2


def _run(benchmark, fn):
    with torch.no_grad():
        return bench(benchmark, fn, device=DEVICE, rounds=ROUNDS)


@pytest.fixture(scope="module")
def projector_inputs():
    linear_1, linear_2 = make_projector(DEVICE, DTYPE)
    features = torch.randn(FRAMES, FRAME_SHAPE[0] * FRAME_SHAPE[1], linear_1.in_features,
                           device=DEVICE, dtype=DTYPE)
    return features, linear_1, linear_2


@pytest.mark.benchmark(group="projector")
@pytest.mark.parametrize("order", ["original", "fast"])
def test_projector(benchmark, projector_inputs, order):
    fn = projector_original if order == "original" else projector_fast
    out = _run(benchmark, lambda: fn(*projector_inputs))
    assert out.shape == (1, POOLING_SHAPE[0] * POOLING_SHAPE[1] * POOLING_SHAPE[2],
                         projector_inputs[2].out_features)


@pytest.mark.benchmark(group="pool")
@pytest.mark.parametrize("impl", ["adaptive_avg_pool3d", "pool_visual_tokens",
                                  "pool_visual_tokens+norms"])
def test_pool(benchmark, projector_inputs, impl):
    features, linear_1, _ = projector_inputs
    with torch.no_grad():
        h = linear_1(features)
    if impl == "adaptive_avg_pool3d":
        fn = lambda: pool_visual_tokens_ref(h, FRAMES, FRAME_SHAPE, POOLING_SHAPE)  # noqa: E731
    else:
        fn = lambda: ops.pool_visual_tokens(  # noqa: E731
            h, FRAMES, FRAME_SHAPE, POOLING_SHAPE, "gelu", return_norms=impl.endswith("norms"))
    _run(benchmark, fn)

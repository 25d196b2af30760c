"""Fused act + adaptive pooling: the Triton kernel (under TRITON_INTERPRET=1 on CPU) and the op's CPU
path against PLLaVA's original nn.AdaptiveAvgPool3d with its rearranges."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from pllava_fast import ops
from pllava_fast.kernels.adaptive import max_window
from pllava_fast.kernels.pooling import _pool_visual_tokens, pool_visual_tokens_ref

# (dtype, atol, rtol): low precision is compared against the fp32 reference on the same inputs,
# so the error is the output rounding (accumulation is fp32)
DTYPES = [
    (torch.float32, 1e-6, 1e-5),
    (torch.bfloat16, 1e-2, 1.6e-2),
    (torch.float16, 1e-3, 2e-3),
]

# (batch, num_frames, frame_shape, pooling_shape, C)
CASES = [
    pytest.param(1, 16, (24, 24), (16, 12, 12), 8, id="pllava-grid-divides"),
    pytest.param(1, 16, (24, 24), (8, 16, 16), 8, id="pllava-grid-overlap"),
    pytest.param(2, 4, (8, 8), (2, 4, 4), 96, id="divides"),
    pytest.param(1, 16, (8, 8), (5, 7, 9), 200, id="overlap-5x7x9"),
    pytest.param(1, 16, (12, 12), (16, 10, 10), 96, id="overlap-16x10x10"),
    pytest.param(3, 4, (6, 6), (1, 1, 1), 200, id="global"),
    pytest.param(2, 4, (6, 6), (16, 12, 12), 96, id="exceeds-grid"),
    pytest.param(3, 1, (8, 8), (1, 4, 4), 200, id="one-frame"),
]


def _inputs(batch, num_frames, frame_shape, c, dtype=torch.float32):
    x = torch.randn(batch * num_frames, frame_shape[0] * frame_shape[1], c)
    return x.to(dtype)


def _expected(x, num_frames, frame_shape, pooling_shape, act="gelu"):
    xf = x.float()
    pooled = pool_visual_tokens_ref(xf, num_frames, frame_shape, pooling_shape, act)
    norms = torch.linalg.vector_norm(ops.apply_activation(xf, act), dim=-1)
    return pooled, norms


@pytest.mark.parametrize("batch,num_frames,frame_shape,pooling_shape,c", CASES)
@pytest.mark.parametrize("path", ["triton", "op"])
def test_pool_matches_adaptive_avg_pool3d_fp32(path, batch, num_frames, frame_shape, pooling_shape, c):
    x = _inputs(batch, num_frames, frame_shape, c)
    want, want_norms = _expected(x, num_frames, frame_shape, pooling_shape)
    if path == "triton":
        got, norms = _pool_visual_tokens(x, num_frames, frame_shape, pooling_shape, "gelu", True)
    else:
        got, norms = ops.pool_visual_tokens(x, num_frames, frame_shape, pooling_shape,
                                            return_norms=True)
    assert got.shape == (batch, pooling_shape[0] * pooling_shape[1] * pooling_shape[2], c)
    assert got.dtype == x.dtype and got.is_contiguous()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(norms, want_norms, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[1:])
@pytest.mark.parametrize("path", ["triton", "op"])
@pytest.mark.parametrize("pooling_shape", [(2, 3, 3), (3, 4, 5)])
def test_pool_low_precision(path, dtype, atol, rtol, pooling_shape):
    x = _inputs(2, 4, (6, 6), 200, dtype)
    want, want_norms = _expected(x, 4, (6, 6), pooling_shape)
    if path == "triton":
        got, norms = _pool_visual_tokens(x, 4, (6, 6), pooling_shape, "gelu", True)
    else:
        got, norms = ops.pool_visual_tokens(x, 4, (6, 6), pooling_shape, return_norms=True)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)
    torch.testing.assert_close(norms, want_norms, atol=1e-5, rtol=1e-5)


# exp overflowing to inf in the sigmoid tails is exact (sigmoid -> 0); numpy warns, GPUs do not
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("act", ops.ACTIVATIONS)
def test_pool_activations(act):
    x = _inputs(2, 4, (6, 6), 96) * 3  # reach the tails of the activations
    want, want_norms = _expected(x, 4, (6, 6), (2, 4, 5), act)
    got, norms = _pool_visual_tokens(x, 4, (6, 6), (2, 4, 5), act, True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(norms, want_norms, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.pool_visual_tokens(x, 4, (6, 6), (2, 4, 5), act), want,
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("block_m,block_c", [(2, 32), (4, 64), (16, 128)])
def test_pool_block_sizes(block_m, block_c):
    """Several C blocks: the per-block partial sums of squares must add up to the norms."""
    x = _inputs(1, 2, (4, 4), 100)
    want, want_norms = _expected(x, 2, (4, 4), (2, 3, 3))
    got, norms = _pool_visual_tokens(x, 2, (4, 4), (2, 3, 3), "gelu", True,
                                     block_m=block_m, block_c=block_c)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(norms, want_norms, atol=1e-5, rtol=1e-5)
    got_plain, none = _pool_visual_tokens(x, 2, (4, 4), (2, 3, 3), "gelu", False,
                                          block_m=block_m, block_c=block_c)
    assert none is None
    torch.testing.assert_close(got_plain, want, atol=1e-6, rtol=1e-5)


@settings(max_examples=8, deadline=None)
@given(
    num_frames=st.integers(1, 5), fh=st.integers(1, 7), fw=st.integers(1, 7),
    pt=st.integers(1, 6), ph=st.integers(1, 8), pw=st.integers(1, 8), c=st.integers(1, 70),
    batch=st.integers(1, 2),
)
def test_pool_any_shape(num_frames, fh, fw, pt, ph, pw, c, batch):
    x = _inputs(batch, num_frames, (fh, fw), c)
    want, want_norms = _expected(x, num_frames, (fh, fw), (pt, ph, pw))
    got, norms = _pool_visual_tokens(x, num_frames, (fh, fw), (pt, ph, pw), "gelu", True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(norms, want_norms, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ops.pool_visual_tokens(x, num_frames, (fh, fw), (pt, ph, pw)), want,
                               atol=1e-6, rtol=1e-5)


def test_max_window():
    assert max_window(24, 12) == 2
    assert max_window(24, 16) == 2  # overlapping windows: [0, 2), [1, 3), [3, 5), ...
    assert max_window(24, 7) == 5
    assert max_window(4, 16) == 1  # repeated cells
    assert max_window(16, 1) == 16


@pytest.mark.parametrize("path", ["triton", "op"])
def test_linear_2_commutes_with_pooling(path):
    """linear_2(pool(act(h))) == pool(linear_2(act(h))): PLLaVA's original order."""
    num_frames, frame_shape, pooling_shape = 4, (6, 6), (3, 4, 5)
    linear_1, linear_2 = torch.nn.Linear(48, 96), torch.nn.Linear(96, 80)
    x = torch.randn(2 * num_frames, 36, 48)
    with torch.no_grad():
        h = linear_1(x)
        original = pool_visual_tokens_ref(linear_2(ops.apply_activation(h, "gelu")), num_frames,
                                          frame_shape, pooling_shape, "identity")
        if path == "triton":
            pooled, _ = _pool_visual_tokens(h, num_frames, frame_shape, pooling_shape, "gelu")
        else:
            pooled = ops.pool_visual_tokens(h, num_frames, frame_shape, pooling_shape)
        fast = linear_2(pooled)
    torch.testing.assert_close(fast, original, atol=1e-5, rtol=1e-5)


def test_grad_path_matches_reference():
    x = torch.randn(8, 36, 32, requires_grad=True)
    got = ops.pool_visual_tokens(x, 4, (6, 6), (3, 4, 5))
    want = pool_visual_tokens_ref(x, 4, (6, 6), (3, 4, 5))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(got)
    (gx,) = torch.autograd.grad(got, x, g)
    (gx_ref,) = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(gx, gx_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("return_norms", [False, True])
def test_opcheck_pool(dtype, return_norms):
    x = torch.randn(8, 36, 24, dtype=dtype)
    torch.library.opcheck(ops.pooling._pool_visual_tokens_op, (x, 4, 6, 6, 3, 4, 5, "gelu", return_norms))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_registration_on_interpreter(dtype):
    """The function registered for CUDA, run on CPU tensors (Triton interpreter; fp64 -> torch)."""
    x = torch.randn(8, 36, 24, dtype=dtype)
    want, want_norms = _expected(x, 4, (6, 6), (3, 4, 5))
    pooled, norms = ops.pooling._pool_visual_tokens_cuda(x, 4, 6, 6, 3, 4, 5, "gelu", True)
    torch.testing.assert_close(pooled.float(), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(norms, want_norms, atol=1e-5, rtol=1e-5)
    pooled, empty = ops.pooling._pool_visual_tokens_cuda(x, 4, 6, 6, 3, 4, 5, "gelu", False)
    assert pooled.dtype == dtype and empty.shape == (0,) and empty.dtype == torch.float32


def test_opcheck_pool_identity_no_pooling():
    """Identity activation with the output grid equal to the input grid: still a fresh tensor."""
    x = torch.randn(8, 36, 24)
    torch.library.opcheck(ops.pooling._pool_visual_tokens_op, (x, 4, 6, 6, 4, 6, 6, "identity", False))
    out = ops.pool_visual_tokens(x, 4, (6, 6), (4, 6, 6), "identity")
    torch.testing.assert_close(out, x.view(2, 144, 24), atol=0, rtol=0)
    assert out.data_ptr() != x.data_ptr()


class _Projector(torch.nn.Module):
    """linear_1 -> fused act + pool -> linear_2, the fast projector order."""

    def __init__(self, d_in, d_out, frame_shape, pooling_shape):
        super().__init__()
        self.linear_1, self.linear_2 = torch.nn.Linear(d_in, d_out), torch.nn.Linear(d_out, d_out)
        self.frame_shape, self.pooling_shape = frame_shape, pooling_shape

    def forward(self, x, num_frames):
        pooled, norms = ops.pool_visual_tokens(self.linear_1(x), num_frames, self.frame_shape,
                                               self.pooling_shape, "gelu", return_norms=True)
        return self.linear_2(pooled), norms


def test_compile_fullgraph_through_projector():
    torch._dynamo.reset()
    proj = _Projector(32, 64, (6, 6), (3, 4, 5)).eval()
    x = torch.randn(8, 36, 32)
    with torch.no_grad():
        want, want_norms = proj(x, 4)
        got, norms = torch.compile(proj, fullgraph=True)(x, 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norms, want_norms)


def test_export_projector():
    proj = _Projector(32, 64, (6, 6), (3, 4, 5)).eval()
    x = torch.randn(8, 36, 32)
    with torch.no_grad():  # inference: the custom op (with grad, the torch path is traced)
        exported = torch.export.export(proj, (x, 4))
        assert "pllava_fast.pool_visual_tokens" in str(exported.graph)
        for got, want in zip(exported.module()(x, 4), proj(x, 4)):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("args,match", [
    ((torch.randn(36, 8), 4, (6, 6), (2, 3, 3)), "rank 2"),
    ((torch.randn(8, 35, 8), 4, (6, 6), (2, 3, 3)), "frame_shape 6x6"),
    ((torch.randn(9, 36, 8), 4, (6, 6), (2, 3, 3)), "not divisible by num_frames=4"),
    ((torch.randn(8, 36, 8), 4, (6, 6), (0, 3, 3)), "pooling_shape"),
    ((torch.randn(8, 36, 8), 4, (6, 6), (2, -1, 3)), "pooling_shape"),
    ((torch.randn(8, 36, 8), 4, (6, 6), (2, 3)), "pooling_shape"),
    ((torch.randn(8, 36, 8), 4, (6, 0), (2, 3, 3)), "frame_shape"),
    ((torch.randn(8, 36, 8), 0, (6, 6), (2, 3, 3)), "num_frames"),
    ((torch.ones(8, 36, 8, dtype=torch.int64), 4, (6, 6), (2, 3, 3)), "floating point"),
    ((torch.randn(0, 36, 8), 4, (6, 6), (2, 3, 3)), "empty"),
    ((torch.randn(8, 36, 8).numpy(), 4, (6, 6), (2, 3, 3)), "torch.Tensor"),
])
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        ops.pool_visual_tokens(*args)


def test_bad_activation():
    with pytest.raises(ValueError, match="unsupported activation 'relu'"):
        ops.pool_visual_tokens(torch.randn(8, 36, 8), 4, (6, 6), (2, 3, 3), act="relu")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_cuda_pllava_shape(dtype, atol, rtol):
    x = torch.randn(32, 576, 1024, device="cuda").to(dtype)
    for pooling_shape in [(16, 12, 12), (8, 16, 16), (5, 7, 9)]:
        want, want_norms = _expected(x, 16, (24, 24), pooling_shape)
        got, norms = ops.pool_visual_tokens(x, 16, (24, 24), pooling_shape, return_norms=True)
        torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)
        torch.testing.assert_close(norms, want_norms, atol=1e-4, rtol=1e-5)

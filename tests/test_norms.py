"""Token norms and per-row norm summaries: the Triton kernels (TRITON_INTERPRET=1 on CPU) and the
ops' CPU path against torch.linalg.vector_norm and torch's max/mean."""
import pytest
import torch

from pllava_fast import ops
from pllava_fast.kernels.norms import _norm_row_stats, _token_norms, norm_row_stats_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1, 1), (2, 37, 200), (3, 1025, 96), (1, 5, 4100)]


def _ref_norms(x):
    return torch.linalg.vector_norm(x.float(), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("path", ["triton", "op"])
def test_token_norms(path, shape, dtype):
    x = (torch.randn(shape) * 4).to(dtype)
    got = _token_norms(x) if path == "triton" else ops.token_norms(x)
    assert got.shape == shape[:2] and got.dtype == torch.float32
    # same fp32 inputs, fp32 accumulation: only the summation order differs
    torch.testing.assert_close(got, _ref_norms(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_r,block_c", [(4, 32), (16, 64)])
def test_token_norms_strided_blocks(block_r, block_c):
    hidden = torch.randn(2, 50, 200)
    x = hidden[:, 1:]  # CLS dropped: a strided view, read in place
    got = _token_norms(x, block_r=block_r, block_c=block_c)
    torch.testing.assert_close(got, _ref_norms(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.token_norms(x), _ref_norms(x), atol=1e-5, rtol=1e-5)
    t = torch.randn(3, 200, 20).transpose(1, 2)  # C not contiguous: copied first
    torch.testing.assert_close(ops.token_norms(t), _ref_norms(t), atol=1e-5, rtol=1e-5)


def _stats_cases():
    ties = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0],
                         [5.0, 1.0, 1.0, 1.0, 5.0]])
    return [
        (ties, torch.tensor([2.0, 0.0, 1.0])),
        (torch.rand(4, 130) * 10, torch.tensor([5.0, 0.0, 9.9, 10.0])),
        (torch.rand(2, 1) * 3, torch.tensor([1.0, 2.0])),
    ]


@pytest.mark.parametrize("block_l", [None, 2, 128])
@pytest.mark.parametrize("case", range(3))
def test_norm_row_stats_kernel(case, block_l):
    norms, thr = _stats_cases()[case]
    mean, maxv, argmax, count = _norm_row_stats(norms, thr, block_l=block_l)
    want_mean, want_max, want_argmax, want_count = norm_row_stats_ref(norms, thr)
    torch.testing.assert_close(mean, want_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maxv, want_max, atol=0, rtol=0)
    torch.testing.assert_close(argmax, want_argmax, atol=0, rtol=0)  # first maximum on ties
    torch.testing.assert_close(count, want_count, atol=0, rtol=0)
    assert argmax.dtype == count.dtype == torch.int64


def test_token_norm_stats_op():
    x = torch.randn(3, 40, 64)
    x[1, 7] *= 10  # one high-norm token
    thr = torch.tensor([8.0, 9.0, 100.0])
    stats = ops.token_norm_stats(x, thr)
    want = _ref_norms(x)
    torch.testing.assert_close(stats.norms, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.mean, want.mean(1))
    torch.testing.assert_close(stats.max, want.amax(1))
    assert stats.argmax[1].item() == 7
    assert stats.count_above.tolist() == (want > thr[:, None]).sum(1).tolist()
    assert stats.count_above[2].item() == 0
    scalar = ops.token_norm_stats(x, 8.0)
    assert scalar.threshold.tolist() == [8.0] * 3
    torch.testing.assert_close(scalar.count_above, (want > 8.0).sum(1))


def test_norm_stats_of_pooling_norms():
    x = torch.randn(8, 36, 32)
    _, norms = ops.pool_visual_tokens(x, 4, (6, 6), (2, 3, 3), return_norms=True)
    stats = ops.norm_stats(norms, torch.tensor(3.0))
    want = torch.linalg.vector_norm(torch.nn.functional.gelu(x), dim=-1)
    torch.testing.assert_close(stats.mean, want.mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.argmax, want.argmax(1))


def test_opcheck_norm_ops():
    for x in (torch.randn(2, 9, 33), torch.randn(2, 9, 33, dtype=torch.bfloat16)):
        torch.library.opcheck(ops.norms._token_norms_op, (x,))
    norms = torch.rand(3, 17)
    torch.library.opcheck(ops.norms._norm_row_stats_op, (norms, torch.full((3,), 0.5)))


def test_compile_fullgraph_token_norm_stats():
    torch._dynamo.reset()
    x = torch.randn(2, 20, 16)
    with torch.no_grad():
        got = torch.compile(ops.token_norm_stats, fullgraph=True, backend="aot_eager")(x, 3.0)
    want = ops.token_norm_stats(x, 3.0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("fn,args,match", [
    (ops.token_norms, (torch.randn(4, 8),), "rank 2"),
    (ops.token_norms, (torch.ones(2, 4, 8, dtype=torch.int32),), "floating point"),
    (ops.token_norm_stats, (torch.randn(2, 4, 8, 1),), "rank 4"),
    (ops.norm_stats, (torch.rand(2, 4, 3),), r"shape \(N, L\)"),
    (ops.norm_stats, (torch.ones(2, 4, dtype=torch.int64),), "floating point"),
    (ops.norm_stats, (torch.rand(2, 0),), "no tokens"),
    (ops.norm_stats, (torch.rand(2, 4), torch.zeros(3)), r"shape \(2,\)"),
    (ops.norm_stats, (torch.rand(2, 4), torch.zeros(2, device="meta")), "threshold is on meta"),
    (ops.token_norm_stats, (torch.randn(2, 4, 8), torch.zeros(2, device="meta")),
     "threshold is on meta"),
])
def test_bad_input(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_norms(dtype):
    x = torch.randn(16, 577, 1024, device="cuda").to(dtype)
    torch.testing.assert_close(ops.token_norms(x[:, 1:]), _ref_norms(x[:, 1:]), atol=1e-4, rtol=1e-5)
    stats = ops.token_norm_stats(x, 32.0)
    want = norm_row_stats_ref(_ref_norms(x), torch.full((16,), 32.0, device="cuda"))
    torch.testing.assert_close(stats.mean, want[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(stats.max, want[1], atol=1e-4, rtol=1e-5)


def test_cuda_registrations_on_interpreter():
    """The functions registered for CUDA, run on CPU tensors through the Triton interpreter."""
    x = torch.randn(2, 9, 33)
    torch.testing.assert_close(ops.norms._token_norms_cuda(x), _ref_norms(x), atol=1e-5, rtol=1e-5)
    norms, thr = torch.rand(3, 17), torch.full((3,), 0.5)
    for got, want in zip(ops.norms._norm_row_stats_cuda(norms, thr), norm_row_stats_ref(norms, thr)):
        torch.testing.assert_close(got, want)

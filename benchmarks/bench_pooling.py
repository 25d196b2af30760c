"""Projector pooling benchmark: PLLaVA's original order vs the fused fast path.

    python -m benchmarks.bench_pooling --device cuda      # bf16, Triton kernels
    python -m benchmarks.bench_pooling                    # CPU: fp32, the torch path

Records (baseline and ours timed in the same run, results/pooling-<device>.json):
  projector  linear_1 -> GELU -> linear_2 on all B*T*H*W tokens -> AdaptiveAvgPool3d (original)
             vs linear_1 -> fused GELU+pool -> linear_2 on the pooled tokens (4x fewer at 16x12x12)
  pool       GELU + rearrange + nn.AdaptiveAvgPool3d + rearrange vs ``pool_visual_tokens``
             (with and without the per-token norms), GB/s = bytes read + written / time
  norms      torch.linalg.vector_norm(x.float()) vs ``token_norms``
"""
from __future__ import annotations

import argparse
import sys

import torch

from pllava_fast import ops
from pllava_fast.devices import default_device
from pllava_fast.kernels.pooling import pool_visual_tokens_ref

from .harness import compare, write_results

# PLLaVA-7B: 16 frames of 24x24 CLIP-L/336 tokens, 1024 -> 4096, pooled to 16x12x12
FRAMES, FRAME_SHAPE, POOLING_SHAPE, D_VISION, D_LLM = 16, (24, 24), (16, 12, 12), 1024, 4096


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def make_projector(device, dtype, d_vision=D_VISION, d_llm=D_LLM, seed=0):
    torch.manual_seed(seed)
    linear_1 = torch.nn.Linear(d_vision, d_llm).to(device, dtype)
    linear_2 = torch.nn.Linear(d_llm, d_llm).to(device, dtype)
    return linear_1, linear_2


def projector_original(features, linear_1, linear_2, num_frames=FRAMES, frame_shape=FRAME_SHAPE,
                       pooling_shape=POOLING_SHAPE):
    """PLLaVA's order: the MLP on every token, then rearrange + AdaptiveAvgPool3d + rearrange."""
    h = linear_2(ops.apply_activation(linear_1(features), "gelu"))
    return pool_visual_tokens_ref(h, num_frames, frame_shape, pooling_shape, "identity")


def projector_fast(features, linear_1, linear_2, num_frames=FRAMES, frame_shape=FRAME_SHAPE,
                   pooling_shape=POOLING_SHAPE):
    """Pool right after linear_1 (fused with GELU); linear_2 runs on the pooled tokens only."""
    return linear_2(ops.pool_visual_tokens(linear_1(features), num_frames, frame_shape,
                                           pooling_shape, "gelu"))


def _pool_bytes(h, pooling_shape, norms=False):
    n_out = h.shape[0] // FRAMES * pooling_shape[0] * pooling_shape[1] * pooling_shape[2]
    written = n_out * h.shape[-1] * h.element_size() + (h.shape[0] * h.shape[1] * 4 if norms else 0)
    return h.numel() * h.element_size() + written


def run(device="cpu", dtype=None, videos=1, warmup=2, repeats=10):
    dtype = dtype or default_dtype(device)
    linear_1, linear_2 = make_projector(device, dtype)
    features = torch.randn(videos * FRAMES, FRAME_SHAPE[0] * FRAME_SHAPE[1], D_VISION,
                           device=device, dtype=dtype)
    n_tokens = features.shape[0] * features.shape[1]
    n_pooled = videos * POOLING_SHAPE[0] * POOLING_SHAPE[1] * POOLING_SHAPE[2]
    timing = dict(device=device, warmup=warmup, repeats=repeats)
    records = []
    with torch.no_grad():
        want = projector_original(features, linear_1, linear_2)
        got = projector_fast(features, linear_1, linear_2)
        max_err = (got.float() - want.float()).abs().max().item()
        fast_flops = 2 * n_tokens * D_VISION * D_LLM + 2 * n_pooled * D_LLM * D_LLM
        records.append(compare(
            "projector", lambda: projector_original(features, linear_1, linear_2),
            lambda: projector_fast(features, linear_1, linear_2), flops=fast_flops,
            original_flops=2 * n_tokens * (D_VISION + D_LLM) * D_LLM,
            max_abs_diff_vs_original=max_err, **timing))

        h = linear_1(features)
        for pooling_shape in (POOLING_SHAPE, (8, 16, 16)):
            for norms in (False, True):
                records.append(compare(
                    f"pool{'+norms' if norms else ''} {pooling_shape}",
                    lambda ps=pooling_shape: pool_visual_tokens_ref(h, FRAMES, FRAME_SHAPE, ps),
                    lambda ps=pooling_shape, n=norms: ops.pool_visual_tokens(
                        h, FRAMES, FRAME_SHAPE, ps, "gelu", return_norms=n),
                    bytes_moved=_pool_bytes(h, pooling_shape, norms), **timing))
        records.append(compare(
            "token_norms", lambda: torch.linalg.vector_norm(h.float(), dim=-1),
            lambda: ops.token_norms(h), bytes_moved=h.numel() * h.element_size() + n_tokens * 4,
            **timing))
    shapes = dict(videos=videos, frames=FRAMES, frame_shape=FRAME_SHAPE,
                  pooling_shape=POOLING_SHAPE, d_vision=D_VISION, d_llm=D_LLM)
    return records, dtype, shapes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--videos", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    records, dtype, shapes = run(
        args.device, getattr(torch, args.dtype) if args.dtype else None, args.videos,
        warmup=args.warmup if args.warmup is not None else (5 if on_cuda else 1),
        repeats=args.repeats if args.repeats is not None else (50 if on_cuda else 3))
    path = write_results("pooling", records, device=args.device, dtype=dtype, **shapes)
    for rec in records:
        extra = "".join(f"  {k}={rec[k]:.3g}" for k in ("ours_GBps", "ours_frac_peak_bw",
                                                       "ours_TFLOPs") if k in rec)
        print(f"{rec['name']:<28} baseline {rec['baseline_s'] * 1e3:9.2f} ms  ours "
              f"{rec['ours_s'] * 1e3:9.2f} ms  x{rec['speedup']:.2f}{extra}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

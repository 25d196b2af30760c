"""The one harness of the benchmarks package: timing (device-synchronised, interleaved repeats),
results JSON (device, versions, commit, shapes, dtype, baseline vs ours, ratio) for the scripts
(``python -m benchmarks.<name>``) and the same synchronised call for the pytest-benchmark suites
(``pytest benchmarks --benchmark-only``).

Every benchmark measures its baseline and pllava-fast in the same run and reports the ratio;
kernels also report achieved GB/s or TFLOP/s against the device peak.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"

# Dense peaks used for "fraction of peak": (HBM GB/s, bf16 dense TFLOP/s). Matched by substring.
DEVICE_PEAKS = {
    "H200": (4800.0, 989.0),
    "H100 80GB HBM3": (3350.0, 989.0),
    "H100": (3350.0, 989.0),
    "A100-SXM4-80GB": (2039.0, 312.0),
    "A100": (1555.0, 312.0),
}


def device_name(device: str | torch.device = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()} threads={torch.get_num_threads()}"


def device_peaks(device: str | torch.device = "cpu"):
    """(GB/s, TFLOP/s) peaks of a known GPU, else (None, None)."""
    name = device_name(device)
    for key, peaks in DEVICE_PEAKS.items():
        if key in name:
            return peaks
    return None, None


def git_commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS_DIR.parent.parent,
            stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return "unknown"


def environment(device="cpu") -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "transformers": tf_version,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def sync(device):
    """Wait for the device's queued work (CUDA kernels run asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def synced(fn: Callable, device) -> Callable:
    """``fn`` followed by a device sync: what a pytest-benchmark round times."""
    def call():
        out = fn()
        sync(device)
        return out

    return call


def bench(benchmark, fn: Callable, *, device="cpu", rounds: int | None = None, warmup: int = 1):
    """Time ``fn`` with pytest-benchmark (synchronised; ``rounds`` fixed for slow CPU cases)."""
    call = synced(fn, device)
    if rounds is None:
        return benchmark(call)
    return benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=warmup)


def time_fn(fn: Callable, *, device="cpu", warmup: int = 2, repeats: int = 10) -> float:
    """Median wall time of ``fn()`` in seconds (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_interleaved(fns: dict, *, device="cpu", warmup: int = 1, repeats: int = 5) -> dict:
    """{name: {"median_s", "min_s"}} of each ``fns[name]()``, the repeats interleaved across the
    functions so that load drifting during the run hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_fn(fn, device=device, warmup=0, repeats=1))
    return {name: {"median_s": statistics.median(t), "min_s": min(t)} for name, t in times.items()}


def compare(name: str, baseline: Callable, ours: Callable, *, device="cpu", bytes_moved=None,
            flops=None, warmup=2, repeats=10, **extra) -> dict:
    """Time baseline and ours in the same run; return a record with the ratio and peak fractions."""
    # interleave the repeats so load drifting during the run hits both sides alike
    for _ in range(warmup):
        baseline()
        ours()
    base_times, our_times = [], []
    for _ in range(repeats):
        base_times.append(time_fn(baseline, device=device, warmup=0, repeats=1))
        our_times.append(time_fn(ours, device=device, warmup=0, repeats=1))
    t_base, t_ours = statistics.median(base_times), statistics.median(our_times)
    rec = {"name": name, "baseline_s": t_base, "ours_s": t_ours, "speedup": t_base / t_ours, **extra}
    gbps_peak, tflops_peak = device_peaks(device)
    if bytes_moved is not None:
        rec["ours_GBps"] = bytes_moved / t_ours / 1e9
        if gbps_peak:
            rec["ours_frac_peak_bw"] = rec["ours_GBps"] / gbps_peak
    if flops is not None:
        rec["ours_TFLOPs"] = flops / t_ours / 1e12
        if tflops_peak:
            rec["ours_frac_peak_flops"] = rec["ours_TFLOPs"] / tflops_peak
    return rec


def command_line(argv=None) -> str:
    """The command that reruns this script: ``python -m benchmarks.<script> <args>`` (``argv``:
    the arguments main() was given, default the process's own)."""
    script = pathlib.Path(sys.argv[0]).stem
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join([f"python -m benchmarks.{script}", *args])


def write_results(benchmark: str, records: list[dict], *, device="cpu", dtype=None, **meta) -> pathlib.Path:
    """Write ``benchmarks/results/<benchmark>-<device tag>.json`` and return its path; ``meta``
    without a ``command`` records ``command_line()``."""
    meta.setdefault("command", command_line())
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    tag = "cpu" if torch.device(device).type == "cpu" else env["device"].replace(" ", "_")
    path = RESULTS_DIR / f"{benchmark}-{tag}.json"
    payload = {"benchmark": benchmark, **env, "dtype": str(dtype) if dtype else None, **meta,
               "results": records}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path

"""The kernels' GPU path without a GPU: Triton compiles every launch their CUDA launchers can
make (each kernel file's ``aot_specs()``) ahead of time for sm_90 with its bundled ptxas.

The CPU tests run the kernels under TRITON_INTERPRET=1, which accepts what real compilation
rejects (dot dims < 16, non-power-of-two blocks, operand dtype mismatches, constexpr misuse), so
this is the only check of the compiled path on a machine without a GPU. The specs also say which
loads must compile to 16-byte vector loads (``kernels/aot.py``).
"""
import os
import subprocess
import sys

import pytest

FAMILIES = ["pooling", "norms", "kv_quant", "decode_attention"]

_SCRIPT = """
import importlib, sys
from pllava_fast.kernels import aot
module = importlib.import_module("pllava_fast.kernels." + sys.argv[1])
specs = module.aot_specs()
for spec in specs:
    aot.compile_spec(spec, arch=90)
print("compiled", len(specs))
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_every_launch_compiles_for_sm90(family):
    """Run in a fresh interpreter without TRITON_INTERPRET (the CPU tests set it; this compiles
    for real); skip where this Triton has no ptxas."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, family], env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("no ptxas available to this Triton")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split("compiled")[-1]) > 0

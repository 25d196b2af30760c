"""Ahead-of-time compilation of the kernels for a GPU that is not here.

Each kernel file lists, in ``aot_specs()``, the signatures and constexprs its CUDA launcher
produces (block choices, autotune candidates), so a kernel change edits one file and the sm_90
compile test (tests/test_sm90_compile.py) loops over whatever the file declares. Triton's bundled
ptxas turns each spec into a cubin; ``loads`` says what the hot loads must compile to:

* ``"vec16"``: at least one 16-byte global load (direct, or a pipelined async copy);
* ``"only_vec16"``: every global load is a 16-byte vector load.

Run without TRITON_INTERPRET (the interpreter accepts what real compilation rejects).
"""
from __future__ import annotations

import dataclasses
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

VEC16 = re.compile(r"ld\.global[.a-z0-9:_]*\.v4\.b32|cp\.async\.c[ag]\.shared\.global "
                   r"\[[^]]*\], \[[^]]*\], 0x10")
_LOADS = re.compile(r"ld\.global[.a-z0-9]*")


@dataclasses.dataclass
class AotSpec:
    """One compilation: ``signature`` maps every argument to a Triton type ("*bf16", "i32",
    "constexpr"), ``constants`` gives the constexprs' values, ``attrs`` the JIT's
    specialisation hints (argument index -> [["tt.divisibility", 16]])."""

    name: str
    fn: object
    signature: dict
    constants: dict
    attrs: dict = dataclasses.field(default_factory=dict)
    num_warps: int = 4
    loads: str | None = None  # None | "vec16" | "only_vec16"


def aligned(*indices: int) -> dict:
    """The divisibility hints the JIT infers for 16-byte aligned pointers / multiples of 16."""
    return {(i,): [["tt.divisibility", 16]] for i in indices}


def compile_spec(spec: AotSpec, arch: int = 90):
    """Compile ``spec`` for sm_<arch>; raise AssertionError when its loads are not as declared."""
    kernel = triton.compile(ASTSource(spec.fn, spec.signature, spec.constants, spec.attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": spec.num_warps})
    assert kernel.asm["cubin"], spec.name
    ptx = kernel.asm["ptx"]
    if spec.loads == "vec16":
        assert VEC16.search(ptx), f"{spec.name}: no 16-byte global loads"
    elif spec.loads == "only_vec16":
        loads = sorted(set(_LOADS.findall(ptx)))
        assert loads == ["ld.global.v4.b32"], f"{spec.name}: global loads {loads}"
    return kernel

"""Build and install pllava-fast.

The top-level ``kernels/`` folder is installed as ``pllava_fast.kernels`` (a top-level ``kernels``
module would shadow the Hugging Face ``kernels`` package that transformers probes for).

``pllava_fast._C`` is built from ``csrc/`` with torch's BuildExtension: the C++ sources always, the
CUDA sources only when torch is a CUDA build and a CUDA toolkit is found. Environment variables:

* ``PLLAVA_FAST_SKIP_CUDA_BUILD=1``  build the CPU sources only;
* ``PLLAVA_FAST_SKIP_EXT=1``         build no extension at all (the package falls back to torch);
* ``TORCH_CUDA_ARCH_LIST``           the CUDA architectures (default "8.0;9.0");
* ``MAX_JOBS``                       parallel compile jobs (ninja).
"""
import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


def _extensions():
    if _flag("PLLAVA_FAST_SKIP_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # torch is installed first; without it we ship the pure-torch package
        print("pllava-fast: torch not importable at build time; building without pllava_fast._C")
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp:
        return [], {}
    with_cuda = (
        bool(cu)
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and not _flag("PLLAVA_FAST_SKIP_CUDA_BUILD")
    )
    extra = {"cxx": ["-O3", "-std=c++17", "-fopenmp"]}
    define = []
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        extra["nvcc"] = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
        define.append(("PLLAVA_FAST_WITH_CUDA", None))
        ext_cls, sources = cpp_extension.CUDAExtension, cpp + cu
    else:
        ext_cls, sources = cpp_extension.CppExtension, cpp
    ext = ext_cls(
        name="pllava_fast._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        define_macros=define,
    )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()

setup(
    name="pllava-fast",
    version="0.1.0",
    description="Fast PLLaVA-style video-language inference: fused Triton kernels, batched "
    "decode-to-tensor, quantized KV cache.",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["pllava_fast", "pllava_fast.cli", "pllava_fast.ops", "pllava_fast.profile",
              "pllava_fast.video", "pllava_fast.kernels"],
    package_dir={"pllava_fast": "pllava_fast", "pllava_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.17,<5.40",
        "safetensors",
        "tokenizers",
        "numpy",
        "pillow",
        "av>=12",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # the Triton kernels (CUDA torch wheels bring a matching triton themselves)
        "triton": ["triton>=3.0"],
        "flash": ["flash-attn>=2.6"],
        # the original PLLaVA's decoder: the baseline of the benchmarks and a test oracle
        "bench": ["decord==0.6.0", "pytest-benchmark"],
        # weight-only int8 / int4 LLM (--weights)
        "quant": ["torchao>=0.18,<0.19"],
        "test": [
            "triton==3.7.1",  # what the tests and CPU benchmarks ran with (3.9 is what >=3.0 finds)
            "pytest",
            "pytest-xdist",
            "pytest-benchmark",
            "hypothesis",
            "ninja",
            "accelerate",
            "decord==0.6.0",
            "torchao>=0.18,<0.19",
        ],
    },
    entry_points={"console_scripts": ["pllava-fast=pllava_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

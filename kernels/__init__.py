"""Triton kernels of pllava-fast, one family per file, each beside its plain-torch reference.

Installed as ``pllava_fast.kernels``. This file must stay free of side effects: with the repository
root on ``sys.path`` transformers may import it as a top-level ``kernels`` while probing for the
Hugging Face package of that name.
"""

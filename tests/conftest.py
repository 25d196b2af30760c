"""Test setup: run Triton kernels under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any ``@triton.jit`` decoration runs, i.e. before the kernel
modules are imported, so it is set here at collection time.
"""
import os
import pathlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER") and not torch.cuda.is_available():
    # one intra-op thread per xdist worker: with 2 workers on 2 cores, more threads oversubscribe
    # and small CPU ops slow down by orders of magnitude
    torch.set_num_threads(1)

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_VIDEOS = REPO.parent / "shared" / "videos"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_videos():
    """Directory of the sample videos (cooking.mp4, jesse_dance.mp4, yoga.mp4, dog.png), if present."""
    if not SHARED_VIDEOS.is_dir():
        pytest.skip(f"sample videos not found at {SHARED_VIDEOS}")
    return SHARED_VIDEOS


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random PLLaVA (4 frames, pooling (4, 2, 2)) saved in the checkpoint layout."""
    from pllava_fast.testing import save_tiny_pllava

    return save_tiny_pllava(tmp_path_factory.mktemp("tiny") / "model", num_frames=4,
                            pooling_shape=(4, 2, 2))

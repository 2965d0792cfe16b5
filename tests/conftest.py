"""Shared fixtures: a tiny random-weight SD 1.x model (DESIGN 6) and the shared test data.

The environment is pinned here, at import, before any test module imports huggingface_hub or
torch (both read these variables once, at their own import), and it reaches CLI subprocesses:
- tests never reach the network, nor read or write the user's Hugging Face cache;
- one CPU thread: tiny models run faster on one, and two OpenMP threads on a busy two-core
  machine spin-wait on each other (measured: a tiny UNet step took 4 s instead of 0.03 s).
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
TEST_HF_CACHE = Path(tempfile.mkdtemp(prefix="fatezero-tests-hf-cache-"))
os.environ["HF_HUB_CACHE"] = str(TEST_HF_CACHE)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _remove_test_hf_cache():
    yield
    shutil.rmtree(TEST_HF_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def hf_cache() -> Path:
    """The private Hugging Face cache these tests run with (empty unless a test fills it)."""
    return TEST_HF_CACHE


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny SD 1.x-shaped diffusers folder, saved once per session; treat it as read-only."""
    from fatezero_cli.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture
def tiny_bundle(tiny_model_dir):
    """A freshly loaded tiny model per test, so attention processors set by one test never leak
    into another."""
    from fatezero_cli.models import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """/work/shared/data (clips and reference frames), which a plain clone does not have."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_clip():
    """Four smooth synthetic 64x64 frames (latents 8x8): fast, and unlike any real clip."""
    import numpy as np

    from fatezero_cli.video import Clip

    y, x = np.mgrid[0:64, 0:64]
    frames = [
        np.stack([(x * 4 + 10 * i) % 256, (y * 4) % 256, ((x + y) * 2 + 20 * i) % 256], axis=-1)
        for i in range(4)
    ]
    return Clip(
        frames=np.stack(frames).astype(np.uint8),
        fps=12.0,
        source=Path("synthetic.mp4"),
        source_size=(64, 64),
    )

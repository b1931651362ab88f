"""Shared test fixtures: where ../shared is, skipping cleanly when it is absent."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("INFINITETALK_SHARED", REPO.parent / "shared"))


def _need(sub: str) -> Path:
    path = SHARED / sub
    if not path.exists():
        pytest.skip(f"{path} is absent (the ../shared folder with parity fixtures and media is not beside the repo)")
    return path


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """../shared/parity (skips when absent)."""
    return _need("parity")


@pytest.fixture(scope="session")
def media_dir() -> Path:
    """../shared/media (skips when absent)."""
    return _need("media")


@pytest.fixture(scope="session")
def tally(request):
    """The fault suites' one session-wide `faults.Tally`; its combined totals are printed once at
    the end (a fixture here, not in faults.py, so every test module shares the same instance)."""
    from faults import Tally

    t = Tally()
    yield t
    text = t.line() + "".join(f"\n  {f}" for f in t.failures[:20])
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print("\n" + text, flush=True)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (tiny models: faster than two on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def report(name: str, got: torch.Tensor, expected: torch.Tensor, rel_tol: float = 1e-4) -> float:
    """Print and return max|got - expected| / max|expected|; assert it is within rel_tol."""
    got = got.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} != expected {tuple(expected.shape)}"
    err = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    rel = err / scale if scale > 0 else err
    print(f"[parity] {name}: max|diff|={err:.3e} max|expected|={scale:.3e} rel={rel:.3e} (tol {rel_tol:.0e})")
    assert rel <= rel_tol, f"{name}: relative error {rel:.3e} > {rel_tol:.0e}"
    return rel

"""Kernel tests: Triton kernels against their pure-torch references.

Without CUDA the kernels run under TRITON_INTERPRET=1 on the CPU with tiny shapes (marker
`unit`); with CUDA the same unit grid runs on the GPU, and the `gpu` tests add real shapes.
Helpers come as fixtures so that the test modules import nothing from here.
"""
import os

import torch

# Before any import of textgen_kernels (tests/conftest.py holds the same guard for other dirs).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

# ||out - ref|| / ||ref|| against the reference run on float32 copies of the inputs. float32:
# the interpreter computes exactly (numpy); on the GPU the kernels keep float32 dots in "ieee"
# mode, leaving only exp2/rsqrt approximations and summation order.
REL_TOL = {
    torch.float32: 1e-4 if torch.cuda.is_available() else 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out.double() - ref.double()).norm()
    return (diff / ref.double().norm().clamp_min(1e-30)).item()


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Every element finite (outputs start poisoned with NaN), then the relative bound of the
    dtype the computation ran in."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    bad = ~torch.isfinite(out)
    assert not bad.any(), f"{what}: {int(bad.sum())}/{out.numel()} elements not finite (unwritten?)"
    err = _rel_err(out, ref)
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.2e} > {REL_TOL[dtype]:.0e} {dtype}"


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def assert_close():
    return _assert_close


@pytest.fixture
def rand(device):
    """rand(*shape, dtype=...) -> fresh normal samples, newly seeded in every test.

    The seed is printed (pytest shows it for a failing test); KERNEL_TEST_SEED=<seed> replays it.
    """
    seed = int(os.environ.get("KERNEL_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"random seed {seed} (KERNEL_TEST_SEED={seed} to replay)")
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)

    draw.generator = gen
    return draw


@pytest.fixture
def poisoned(device):
    """poisoned(shape, dtype) -> a NaN-filled output buffer, to catch unwritten elements."""
    return lambda shape, dtype: torch.full(shape, float("nan"), dtype=dtype, device=device)

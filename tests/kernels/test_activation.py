"""silu_and_mul (Triton) against silu_and_mul_reference."""
import pytest
import torch

from textgen_kernels import activation

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# the interpreter trips a numpy deprecation in its own scalar handling
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")


def run_silu_and_mul(rand, poisoned, assert_close, *, shape, dtype, strided=False):
    if strided:  # rows of a wider buffer
        x = rand(shape[0], shape[1] + 40, dtype=dtype, scale=3.0)[:, 8: 8 + shape[1]]
    else:
        x = rand(*shape, dtype=dtype, scale=3.0)
    out = poisoned((*shape[:-1], shape[-1] // 2), dtype)
    activation.silu_and_mul(x, out=out)
    assert_close(out, activation.silu_and_mul_reference(x.float()), dtype, "silu_and_mul")


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,strided", [((7, 128), False), ((5, 4200), True), ((2, 3, 86), False)]
)
def test_silu_and_mul(rand, poisoned, assert_close, dtype, shape, strided):
    run_silu_and_mul(rand, poisoned, assert_close, shape=shape, dtype=dtype, strided=strided)


@pytest.mark.unit
def test_silu_and_mul_matches_reference_rounding(rand):
    """float16 (rounded to nearest by the interpreter too): silu rounded, then the product."""
    x = rand(64, 512, dtype=torch.float16, scale=3.0)
    mismatched = (activation.silu_and_mul(x) != activation.silu_and_mul_reference(x)).float().mean()
    assert mismatched.item() < 0.02, f"{mismatched.item():.1%} of elements differ"


@pytest.mark.unit
def test_silu_and_mul_rejects_bad_inputs(rand):
    with pytest.raises(ValueError, match="2\\*I"):
        activation.silu_and_mul(rand(4, 7))
    with pytest.raises(ValueError, match="dtype"):
        activation.silu_and_mul(rand(4, 8).int())
    with pytest.raises(ValueError, match="out"):
        activation.silu_and_mul(rand(4, 8), out=rand(4, 8))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(4096, 2 * 14336), (3, 2 * 11008)])
def test_silu_and_mul_gpu(rand, poisoned, assert_close, dtype, shape):
    run_silu_and_mul(rand, poisoned, assert_close, shape=shape, dtype=dtype)

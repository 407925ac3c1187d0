"""rms_norm / fused_add_rms_norm (Triton) against their torch references."""
import pytest
import torch

from textgen_kernels import rmsnorm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# the interpreter trips a numpy deprecation in its own scalar handling
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")


def run_norms(rand, poisoned, assert_close, *, shape, dtype, weight_dtype=None, strided=False):
    hidden = shape[-1]
    weight_dtype = weight_dtype or dtype
    eps = 1e-5
    weight = rand(hidden, dtype=weight_dtype, scale=0.5) + 1.0
    if strided:  # rows of a wider buffer (2-D only)
        x = rand(shape[0], hidden + 24, dtype=dtype, scale=3.0)[:, 5: 5 + hidden]
    else:
        x = rand(*shape, dtype=dtype, scale=3.0)
    residual = rand(*shape, dtype=dtype, scale=3.0)
    out_dtype = torch.promote_types(dtype, weight_dtype)

    out = poisoned(shape, out_dtype)
    rmsnorm.rms_norm(x, weight, eps, out=out)
    ref = rmsnorm.rms_norm_reference(x.float(), weight.float(), eps)
    assert_close(out, ref, dtype, "rms_norm")
    assert rmsnorm.rms_norm(x, weight, eps).dtype == out_dtype  # torch's promotion

    normed, summed = poisoned(shape, out_dtype), poisoned(shape, dtype)
    rmsnorm.fused_add_rms_norm(x, residual, weight, eps, out=normed, summed_out=summed)
    ref_normed, ref_summed = rmsnorm.fused_add_rms_norm_reference(x, residual, weight, eps)
    # the sum is rounded to the model dtype as torch's x + residual rounds it: exactly, except
    # that the interpreter's float32 -> bfloat16 cast truncates instead of rounding to nearest
    if dtype == torch.bfloat16 and summed.device.type == "cpu":
        assert torch.allclose(summed.float(), ref_summed.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(summed, ref_summed), "summed differs from x + residual"
    ref_normed_f32 = rmsnorm.rms_norm_reference(ref_summed.float(), weight.float(), eps)
    assert_close(normed, ref_normed_f32, dtype, "fused_add_rms_norm")
    assert normed.dtype == ref_normed.dtype


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 64), (5, 200), (2, 3, 96)])
def test_rms_norm(rand, poisoned, assert_close, dtype, shape):
    run_norms(rand, poisoned, assert_close, shape=shape, dtype=dtype)


@pytest.mark.unit
def test_rms_norm_strided_rows_and_float32_weight(rand, poisoned, assert_close):
    run_norms(rand, poisoned, assert_close, shape=(6, 128), dtype=torch.bfloat16, strided=True)
    run_norms(rand, poisoned, assert_close, shape=(6, 128), dtype=torch.bfloat16,
              weight_dtype=torch.float32)


def check_reference_rounding(rand, dtype):
    """Same-dtype references: the kernels round where they do (the sum to dtype, the normalized
    row to dtype, then * weight). rsqrt/summation order may flip a rare rounding; a missing or
    extra rounding step flips many."""
    x, residual = rand(64, 256, dtype=dtype, scale=3.0), rand(64, 256, dtype=dtype, scale=3.0)
    weight = rand(256, dtype=dtype) + 1
    results = {
        "rms_norm": (
            rmsnorm.rms_norm(x, weight, 1e-6), rmsnorm.rms_norm_reference(x, weight, 1e-6)
        ),
        "fused_add_rms_norm": (
            rmsnorm.fused_add_rms_norm(x, residual, weight, 1e-6)[0],
            rmsnorm.fused_add_rms_norm_reference(x, residual, weight, 1e-6)[0],
        ),
    }
    for name, (out, ref) in results.items():
        mismatched = (out != ref).float().mean().item()
        assert mismatched < 0.02, f"{name}: {mismatched:.1%} of elements differ ({dtype})"


@pytest.mark.unit
def test_rms_norm_matches_reference_rounding(rand):
    # float16: the interpreter rounds it to nearest like the GPU (its bfloat16 cast truncates)
    check_reference_rounding(rand, torch.float16)


@pytest.mark.gpu
@requires_cuda
def test_rms_norm_matches_reference_rounding_bf16_gpu(rand):
    check_reference_rounding(rand, torch.bfloat16)


@pytest.mark.unit
def test_fused_add_rms_norm_in_place(rand):
    x, residual = rand(5, 96, dtype=torch.float16), rand(5, 96, dtype=torch.float16)
    weight = rand(96, dtype=torch.float16) + 1
    ref_normed, ref_summed = rmsnorm.fused_add_rms_norm_reference(x, residual, weight, 1e-6)
    normed, summed = rmsnorm.fused_add_rms_norm(x, residual, weight, 1e-6, out=x,
                                                summed_out=residual)
    assert normed.data_ptr() == x.data_ptr() and summed.data_ptr() == residual.data_ptr()
    assert torch.equal(residual, ref_summed)
    assert torch.allclose(x.float(), ref_normed.float(), rtol=2e-3, atol=2e-3)


@pytest.mark.unit
def test_rms_norm_rejects_bad_inputs(rand):
    x, weight = rand(4, 64), rand(64)
    with pytest.raises(ValueError, match="weight"):
        rmsnorm.rms_norm(x, rand(32), 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        rmsnorm.rms_norm(rand(64, 4).t(), weight, 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rmsnorm.fused_add_rms_norm(x, x.half(), weight, 1e-6)
    with pytest.raises(ValueError, match="dtype"):
        rmsnorm.rms_norm(x.int(), weight, 1e-6)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(4096, 4096), (3, 8192), (1000, 5120)])
def test_rms_norm_gpu(rand, poisoned, assert_close, dtype, shape):
    run_norms(rand, poisoned, assert_close, shape=shape, dtype=dtype)

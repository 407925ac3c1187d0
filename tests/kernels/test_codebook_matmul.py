"""codebook_matmul (bitsandbytes NF4 / FP4 weights) against its reference: x @ dequantize(W),
over batch sizes (the CUDA-core and the tensor-core paths), masked row and column tails, bias
and activation dtypes; and the layer of --quantize bitsandbytes-nf4 / -fp4 on the kernel."""
import pytest
import torch

from textgen_backend.quantization import formats
from textgen_kernels import codebook_matmul as cm


def _weight(rand, n, k, quant_type, device):
    packed = formats.quantize_4bit(rand(n, k).float().cpu(), quant_type)
    code = torch.tensor(formats.CODES[quant_type], dtype=torch.float32)
    return packed.data.to(device), packed.absmax.to(device), code.to(device)


@pytest.mark.unit
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("m,k,n,bias", [(1, 128, 64, False), (3, 192, 40, True),
                                        (8, 256, 96, False), (20, 128, 72, True),
                                        (40, 64, 64, False)])
def test_codebook_matmul_float32(rand, assert_close, device, quant_type, m, k, n, bias):
    data, absmax, code = _weight(rand, n, k, quant_type, device)
    x = rand(m, k)
    b = rand(n) if bias else None
    out = cm.codebook_matmul(x, data, absmax, code, n, b)
    ref = cm.codebook_matmul_reference(x, data, absmax, code, n, b)
    assert_close(out, ref, torch.float32, f"{quant_type} M={m} K={k} N={n}")


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [2, 24])
def test_codebook_matmul_half_activations(rand, assert_close, device, dtype, m):
    data, absmax, code = _weight(rand, 64, 128, "nf4", device)
    x = rand(m, 128, dtype=dtype)
    out = cm.codebook_matmul(x, data, absmax, code, 64)
    ref = cm.codebook_matmul_reference(x.float(), data, absmax, code, 64)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, f"M={m} {dtype}")


@pytest.mark.unit
def test_bad_shapes_are_refused(rand, device):
    data, absmax, code = _weight(rand, 64, 128, "nf4", device)
    with pytest.raises(ValueError, match="multiple of 64"):
        cm.codebook_matmul(rand(2, 96), data, absmax, code, 64)


@pytest.mark.unit
@pytest.mark.parametrize("scheme", ["bitsandbytes-nf4", "bitsandbytes-fp4"])
def test_the_4bit_layer_on_the_kernel_equals_its_reference(rand, device, scheme):
    from textgen_backend.layers.ops import TORCH_OPS
    from textgen_backend.quantization.linear import OnTheFlyQuantizedLinear

    with torch.device(device):
        dense = torch.nn.Linear(128, 48, bias=True)
    layer = OnTheFlyQuantizedLinear(dense, scheme, TORCH_OPS)
    x = rand(2, 3, 128)
    reference = layer(x)
    layer.use_kernels = True
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)

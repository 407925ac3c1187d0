"""quant_matmul (Triton: split-K GEMV and tiled tensor-core kernels) against
x @ dequantize(w), over shapes, group sizes, bits, act-order and activation dtypes."""
import pytest
import torch

from textgen_kernels import quant_matmul as qm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# the interpreter trips a numpy deprecation in its own scalar handling
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")
C = qm.QuantMatmulConfig


def random_weight(rand, k, n, group_size, bits, act_order, device, scale_dtype=torch.float16):
    """Random packed words (every bit pattern), asymmetric zeros in [0, 2**bits] (16: the GPTQ
    v1 reading of a stored 15), positive scales ~ 1/sqrt(K), optional act-order permutation."""
    gen = rand.generator
    pack = 32 // bits
    qweight = torch.randint(-2**31, 2**31 - 1, (k // pack, n), generator=gen, dtype=torch.int32)
    groups = -(-k // group_size)
    zeros = torch.randint(0, (1 << bits) + 1, (groups, n), generator=gen).to(torch.float16)
    scales = (torch.rand(groups, n, generator=gen) + 0.5) / (k ** 0.5 * (1 << bits) / 3)
    perm = torch.randperm(k, generator=gen).to(torch.int32) if act_order else None
    return dict(qweight=qweight.to(device), scales=scales.to(scale_dtype).to(device),
                zeros=zeros.to(device), group_size=group_size, bits=bits,
                perm=None if perm is None else perm.to(device))


def check(rand, poisoned, assert_close, device, m, k, n, group_size, bits=4, act_order=False,
          dtype=torch.float32, bias=False, config=None, scale_dtype=torch.float16):
    w = random_weight(rand, k, n, group_size, bits, act_order, device, scale_dtype)
    x = rand(m, k, dtype=dtype)
    b = rand(n, dtype=dtype) if bias else None
    out = poisoned((m, n), dtype)
    qm.quant_matmul(x, **w, bias=b, out=out, config=config)
    ref = qm.quant_matmul_reference(x.float(), **w, bias=None if b is None else b.float())
    assert_close(out, ref, dtype, f"M={m} K={k} N={n} g={group_size} bits={bits} "
                                  f"perm={act_order} {config}")
    return out


G, T, TT = "gemv", "tiled", "tiled_t"
# (M, K, N, group_size, bits, act_order, bias, config): every kernel, split and not, masked
# column / row tails, one group (-1), tiles of one group split across programs.
UNIT_CASES = [
    (1, 128, 96, 32, 4, False, False, C(G, 1, 32, 32, 1, 1, split_k=1)),
    (1, 128, 100, 64, 4, True, True, C(G, 1, 32, 64, 1, 1, split_k=2)),
    (2, 256, 64, 256, 4, False, False, C(G, 2, 64, 64, 1, 1)),  # group -1, default split
    (3, 128, 72, 32, 8, True, True, C(G, 4, 32, 32, 1, 1, split_k=3)),
    (6, 128, 64, 64, 4, False, True, C(G, 8, 32, 32, 2, 1, split_k=2)),
    (5, 128, 96, 32, 4, True, True, C(T, 16, 32, 32, 4, 1, split_k=2)),
    (20, 128, 40, 64, 4, False, False, C(T, 16, 64, 64, 4, 1, split_k=1)),
    (33, 64, 64, 64, 8, False, True, C(T, 32, 32, 16, 4, 1, split_k=4)),
    # more splits than the last program sums per load (its reduction loops)
    (1, 512, 64, 128, 4, False, True, C(G, 1, 32, 16, 1, 1, split_k=12)),
    (40, 128, 64, 32, 4, True, False, C(T, 32, 64, 16, 1, 1, split_k=3)),
]
# the transposed tiled kernel multiplies half-precision operands
HALF_CASES = [
    (1, C(G, 1, 32, 32, 1, 1, split_k=2)),
    (4, C(G, 4, 64, 64, 1, 1)),
    (24, C(T, 32, 32, 32, 4, 1, split_k=2)),
    (7, C(TT, 16, 32, 32, 4, 1, split_k=3)),
    (37, C(TT, 32, 64, 64, 4, 1, split_k=1)),
]


@pytest.mark.unit
@pytest.mark.parametrize("m,k,n,group_size,bits,act_order,bias,config", UNIT_CASES)
def test_quant_matmul_float32(rand, poisoned, assert_close, device, m, k, n, group_size, bits,
                              act_order, bias, config):
    check(rand, poisoned, assert_close, device, m, k, n, group_size, bits, act_order,
          torch.float32, bias, config)


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,config", HALF_CASES)
def test_quant_matmul_half_activations(rand, poisoned, assert_close, device, dtype, m, config):
    check(rand, poisoned, assert_close, device, m, 128, 64, 32, 4, True, dtype, True, config,
          scale_dtype=dtype)


@pytest.mark.unit
def test_default_configs_and_split_counters_reset(rand, poisoned, assert_close, device):
    """The launcher's own choice at decode and prefill sizes; a split launch leaves its tile
    counters zero (the next launch, or a CUDA graph replay, counts from zero again)."""
    for m in (1, 3, 8, 70):
        check(rand, poisoned, assert_close, device, m, 128, 64, 64)
    assert int(qm._locks(torch.device(device)).abs().sum()) == 0
    first = check(rand, poisoned, assert_close, device, 1, 128, 64, 32,
                  config=C(G, 1, 32, 32, 1, 1, split_k=4))
    assert int(qm._locks(torch.device(device)).abs().sum()) == 0
    assert torch.isfinite(first).all()


@pytest.mark.unit
def test_quantized_linear_kernel_path_equals_reference_path(rand, device):
    """The model layer on the kernels (3-D input, bias) against the same layer on the torch
    reference (the engine's CPU path)."""
    from textgen_backend.layers.ops import TORCH_OPS
    from textgen_backend.layers.quantized_linear import QuantizedLinear
    from textgen_backend.weights.quantization import QuantConfig

    with torch.device(device):
        layer = QuantizedLinear(64, 48, True, TORCH_OPS, QuantConfig("gptq", group_size=32))
    layer.bias.data = rand(48)
    layer.perm = torch.randperm(64, generator=rand.generator).to(torch.int32).to(device)
    x = rand(2, 3, 64)
    reference = layer(x)
    layer.use_kernels = True
    kernel = layer(x)
    assert kernel.shape == (2, 3, 48)
    torch.testing.assert_close(kernel, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_eetq_layer_on_the_kernels_equals_int8_per_channel(rand, device):
    """--quantize eetq's layer (quantization/linear.py: int8 per channel in this layout, one
    group, zero 128, float32 scales) on the kernels against x @ (q * scale)^T."""
    from textgen_backend.layers.ops import TORCH_OPS
    from textgen_backend.quantization import formats
    from textgen_backend.quantization.linear import eetq_linear

    with torch.device(device):
        dense = torch.nn.Linear(128, 64, bias=True)
    layer = eetq_linear(dense, TORCH_OPS)
    layer.use_kernels = True
    weight = formats.dequantize_int8_rows(*formats.quantize_int8_rows(dense.weight.detach()))
    for m in (1, 5, 40):  # the GEMV and the tiled kernels
        x = rand(m, 128)
        expected = x @ weight.T + dense.bias.detach()
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.unit
def test_bad_arguments_are_refused(rand, device):
    w = random_weight(rand, 64, 32, 32, 4, False, device)
    with pytest.raises(ValueError, match="x must be"):
        qm.quant_matmul(rand(2, 64, dtype=torch.float32).t().contiguous().t(), **w)
    with pytest.raises(ValueError, match="qweight must be"):
        qm.quant_matmul(rand(2, 128), **w)
    w["zeros"] = w["zeros"][:1]
    with pytest.raises(ValueError, match="zeros must be"):
        qm.quant_matmul(rand(2, 64), **w)


# --- GPU: the Llama-3-8B projections ---------------------------------------------------------

LLAMA3_SHAPES = {"qkv_proj": (4096, 6144), "o_proj": (4096, 4096),
                 "gate_up_proj": (4096, 28672), "down_proj": (14336, 4096)}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 32, 64, 200])
@pytest.mark.parametrize("shape", list(LLAMA3_SHAPES))
def test_llama3_shapes_bfloat16(rand, poisoned, assert_close, device, shape, m):
    k, n = LLAMA3_SHAPES[shape]
    check(rand, poisoned, assert_close, device, m, k, n, 128, dtype=torch.bfloat16)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("config", [
    C(G, 8, 256, 16, 2, 1), C(TT, 16, 128, 128, 4, 3),
    C(TT, 16, 64, 128, 4, 3), C(TT, 32, 128, 64, 4, 3), C(TT, 64, 128, 64, 4, 3),
    C(TT, 32, 256, 64, 8, 3)])
@pytest.mark.parametrize("m", [8, 13, 32, 64])
def test_small_batch_kernels_on_gpu(rand, poisoned, assert_close, device, config, m):
    """The small-batch candidates of bench/bench_quant.py's sweep, at real shapes."""
    if m > config.block_m * 2:
        pytest.skip("more than two row blocks: not a shape this config serves")
    check(rand, poisoned, assert_close, device, m, 4096, 6144, 128, act_order=m == 13,
          dtype=torch.bfloat16, bias=m == 13, config=config)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("m,dtype,bits,act_order", [
    (1, torch.float16, 4, False), (64, torch.float16, 4, False), (8, torch.float16, 4, True),
    (1, torch.bfloat16, 4, True), (16, torch.bfloat16, 4, True),
    (1, torch.bfloat16, 8, False), (32, torch.bfloat16, 8, False),
    (1, torch.float32, 4, True), (32, torch.float32, 4, True),
])
def test_variants_on_gpu(rand, poisoned, assert_close, device, m, dtype, bits, act_order):
    check(rand, poisoned, assert_close, device, m, 4096, 4096, 128, bits, act_order, dtype,
          bias=True)


@pytest.mark.gpu
@requires_cuda
def test_cuda_graph_replays_split_k(rand, device):
    """Captured split-K launches replay correctly again and again (counters reset)."""
    w = random_weight(rand, 4096, 4096, 128, 4, False, device)
    x = rand(1, 4096, dtype=torch.bfloat16)
    expected = qm.quant_matmul(x, **w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = qm.quant_matmul(x, **w)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)

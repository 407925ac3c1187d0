"""rotary_embedding (Triton) against rotary_embedding_reference."""
import pytest
import torch

from textgen_kernels import rotary

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# the interpreter trips a numpy deprecation in its own scalar handling
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")


def cos_sin_cache(max_positions: int, head_dim: int, device, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1).float().to(device)


def qkv_views(rand, num_tokens, num_q_heads, num_kv_heads, head_dim, dtype):
    """q and k as views into a fused QKV output, as the model produces them."""
    qkv = rand(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    q = qkv[:, : num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)
    k = qkv[:, num_q_heads * head_dim: (num_q_heads + num_kv_heads) * head_dim]
    return qkv, q, k.view(num_tokens, num_kv_heads, head_dim)


def run_rotary(rand, poisoned, assert_close, *, num_tokens, heads, head_dim, dtype, strided):
    num_q_heads, num_kv_heads = heads
    if strided:
        _, q, k = qkv_views(rand, num_tokens, num_q_heads, num_kv_heads, head_dim, dtype)
    else:
        q = rand(num_tokens, num_q_heads, head_dim, dtype=dtype)
        k = rand(num_tokens, num_kv_heads, head_dim, dtype=dtype)
    cache = cos_sin_cache(4096, head_dim, q.device)
    positions = torch.randint(0, 4096, (num_tokens,), generator=rand.generator).to(q.device)
    q_out, k_out = poisoned(q.shape, dtype), poisoned(k.shape, dtype)
    rotary.rotary_embedding(positions, q, k, cache, q_out=q_out, k_out=k_out)
    q_ref, k_ref = rotary.rotary_embedding_reference(positions, q.float(), k.float(), cache)
    assert_close(q_out, q_ref, dtype, "q")
    assert_close(k_out, k_ref, dtype, "k")


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,head_dim,strided", [
    ((4, 4), 64, False), ((8, 2), 128, True), ((6, 1), 80, True), ((3, 3), 96, False),
])
def test_rotary(rand, poisoned, assert_close, dtype, heads, head_dim, strided):
    run_rotary(rand, poisoned, assert_close, num_tokens=13, heads=heads, head_dim=head_dim,
               dtype=dtype, strided=strided)


@pytest.mark.unit
def test_rotary_in_place_touches_only_q_and_k(rand, assert_close, device):
    cache = cos_sin_cache(64, 64, device)
    qkv, q, k = qkv_views(rand, 9, 4, 2, 64, torch.float32)
    before = qkv.clone()
    positions = torch.randint(0, 64, (9,), generator=rand.generator).to(qkv.device)
    q_ref, k_ref = rotary.rotary_embedding_reference(positions, q, k, cache)
    q_rot, k_rot = rotary.rotary_embedding_(positions, q, k, cache)
    assert q_rot.data_ptr() == q.data_ptr() and k_rot.data_ptr() == k.data_ptr()
    assert_close(q, q_ref, torch.float32, "q in place")
    assert_close(k, k_ref, torch.float32, "k in place")
    assert torch.equal(qkv[:, 6 * 64:], before[:, 6 * 64:]), "v was modified"


@pytest.mark.unit
def test_rotary_rejects_bad_inputs(rand, device):
    cache = cos_sin_cache(64, 64, device)
    q, k = rand(3, 4, 64), rand(3, 2, 64)
    positions = torch.arange(3, device=q.device)
    with pytest.raises(ValueError, match="k.dtype"):
        rotary.rotary_embedding(positions, q, k.half(), cache)
    with pytest.raises(ValueError, match="positions"):
        rotary.rotary_embedding(positions.float(), q, k, cache)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        rotary.rotary_embedding(positions, q, k, cache[:, :32])
    with pytest.raises(ValueError, match="contiguous"):
        rotary.rotary_embedding(positions, q.transpose(1, 2).contiguous().transpose(1, 2), k, cache)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads", [(32, 8), (32, 32), (64, 8)])
def test_rotary_gpu(rand, poisoned, assert_close, dtype, heads):
    run_rotary(rand, poisoned, assert_close, num_tokens=4097, heads=heads, head_dim=128,
               dtype=dtype, strided=True)

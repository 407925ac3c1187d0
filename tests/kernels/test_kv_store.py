"""store_kv (Triton) against store_kv_reference."""
import pytest
import torch

from textgen_kernels import kv_store

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# the interpreter trips a numpy deprecation in its own scalar handling
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")


def run_store(rand, *, num_tokens, num_kv_heads, head_dim, num_blocks, page, dtype, pad_every=0,
              strided=False):
    gen = rand.generator
    k_cache = rand(num_blocks, page, num_kv_heads, head_dim, dtype=dtype)
    v_cache = rand(num_blocks, page, num_kv_heads, head_dim, dtype=dtype)
    slots = torch.randperm(num_blocks * page, generator=gen)[:num_tokens]
    if pad_every:
        slots[::pad_every] = -1
    slots = slots.to(device=k_cache.device, dtype=torch.int32)
    if strided:  # key/value as views into a fused [T, (Hq + 2 Hkv) * D] QKV output
        width = num_kv_heads * head_dim
        qkv = rand(num_tokens, 3 * width, dtype=dtype)
        key = qkv[:, width: 2 * width].view(num_tokens, num_kv_heads, head_dim)
        value = qkv[:, 2 * width:].view(num_tokens, num_kv_heads, head_dim)
    else:
        key = rand(num_tokens, num_kv_heads, head_dim, dtype=dtype)
        value = rand(num_tokens, num_kv_heads, head_dim, dtype=dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kv_store.store_kv_reference(key, value, k_ref, v_ref, slots)
    kv_store.store_kv(key, value, k_cache, v_cache, slots)
    # a copy is exact: every stored slot, and every slot left alone (padding, other tokens')
    assert torch.equal(k_cache, k_ref), "k_cache differs from the reference"
    assert torch.equal(v_cache, v_ref), "v_cache differs from the reference"
    assert not torch.equal(k_ref, k_ref.new_zeros(())) and (slots >= 0).any()


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads,head_dim,pad_every,strided", [
    (2, 64, 0, False), (1, 80, 3, False), (4, 128, 2, True), (3, 96, 5, True),
])
def test_store_kv(rand, dtype, num_kv_heads, head_dim, pad_every, strided):
    run_store(rand, num_tokens=37, num_kv_heads=num_kv_heads, head_dim=head_dim, num_blocks=7,
              page=8, dtype=dtype, pad_every=pad_every, strided=strided)


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_into_an_fp8_cache_saturates(rand, dtype):
    """--kv-cache-dtype fp8: the kernel stores what the reference stores, bit for bit, and
    values past e4m3's 448 saturate instead of turning NaN. The values are e4m3's own, or
    beyond its range: the Triton interpreter's float -> fp8 rounding carries wrongly where a
    value rounds up to a power of two (125 gave 64), a rounding the GPU does in hardware."""
    fp8 = torch.float8_e4m3fn
    k_cache = rand(7, 8, 2, 64).to(fp8)
    v_cache = rand(7, 8, 2, 64).to(fp8)
    slots = torch.randperm(56, generator=rand.generator)[:37].to(torch.int32)
    slots[::4] = -1
    slots = slots.to(k_cache.device)
    key = rand(37, 2, 64).to(fp8).float()
    key[::3, 0, :8] = 1000.0                    # past 448: saturates
    key[1::3, 1, :8] = -600.0
    key = key.to(dtype)
    value = rand(37, 2, 64).to(fp8).to(dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kv_store.store_kv_reference(key, value, k_ref, v_ref, slots)
    kv_store.store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(torch.uint8), k_ref.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), v_ref.view(torch.uint8))
    assert not torch.isnan(k_cache.float()).any() and k_cache.float().abs().max() == 448


@pytest.mark.unit
def test_store_kv_rejects_bad_inputs(rand):
    k_cache = rand(4, 16, 2, 64)
    key = rand(5, 2, 64)
    slots = torch.arange(5, dtype=torch.int32, device=key.device)
    with pytest.raises(ValueError, match="dtype"):
        kv_store.store_kv(key.half(), key.half(), k_cache, k_cache.clone(), slots)
    with pytest.raises(ValueError, match="contiguous"):
        kv_store.store_kv(key.transpose(1, 2).contiguous().transpose(1, 2), key, k_cache,
                          k_cache.clone(), slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        kv_store.store_kv(key, key, k_cache, k_cache.clone(), slots.float())
    with pytest.raises(ValueError, match="key must be"):
        kv_store.store_kv(rand(5, 3, 64), key, k_cache, k_cache.clone(), slots)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_kv_heads", [8, 32])
def test_store_kv_gpu(rand, dtype, num_kv_heads):
    run_store(rand, num_tokens=4099, num_kv_heads=num_kv_heads, head_dim=128, num_blocks=4096,
              page=16, dtype=dtype, pad_every=7, strided=True)

"""paged_attention / paged_attention_decode (Triton) against their torch references.

Every case draws a scattered block table (sequences own random, non-adjacent blocks) whose
unused entries point at random other blocks, so reading past a context changes the result.
"""
import itertools

import pytest
import torch

from textgen_kernels import paged_attention as pa

# the interpreter trips a numpy deprecation in its own scalar handling
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (num_q_heads, num_kv_heads): GQA ratios 1, 4 and 8
GQA = [(4, 4), (8, 2), (8, 1)]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_cache(rand, ctx_lens, num_kv_heads, head_dim, page, dtype, table_width=None):
    """Random K/V caches and a scattered block table covering ctx_lens."""
    needed = [-(-c // page) for c in ctx_lens]
    width = max(table_width or 0, max(needed), 1)
    num_blocks = sum(needed) + 5
    k_cache = rand(num_blocks, page, num_kv_heads, head_dim, dtype=dtype)
    v_cache = rand(num_blocks, page, num_kv_heads, head_dim, dtype=dtype)
    gen = rand.generator
    owned = torch.randperm(num_blocks, generator=gen).tolist()
    # entries past a sequence's blocks: random (valid) ids the kernel must ignore
    table = torch.randint(0, num_blocks, (len(ctx_lens), width), generator=gen, dtype=torch.int32)
    for b, n in enumerate(needed):
        table[b, :n] = torch.tensor(owned[:n], dtype=torch.int32)
        owned = owned[n:]
    device = k_cache.device
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
    return k_cache, v_cache, table.to(device), ctx


def upcast(*tensors):
    return [t.float() for t in tensors]


# ---------------------------------------------------------------------------------- decode

def run_decode(rand, poisoned, assert_close, *, ctx_lens, heads, head_dim, page, dtype,
               window=None, table_width=None, config=None, fp8_cache=False):
    num_q_heads, num_kv_heads = heads
    k_cache, v_cache, table, ctx = make_cache(
        rand, ctx_lens, num_kv_heads, head_dim, page, dtype, table_width)
    if fp8_cache:  # --kv-cache-dtype fp8: the kernels read it in q's dtype
        k_cache, v_cache = k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn)
    q = rand(len(ctx_lens), num_q_heads, head_dim, dtype=dtype)
    scale = head_dim ** -0.5
    out = poisoned(q.shape, dtype)
    if config is None:
        pa.paged_attention_decode(q, k_cache, v_cache, ctx, table, scale, window, out=out)
    else:
        pa._launch_decode(q, k_cache, v_cache, ctx, table, scale, window, out, *config)
    ref = pa.paged_attention_decode_reference(*upcast(q, k_cache, v_cache), ctx, table, scale,
                                              window)
    live = ctx > 0
    assert torch.equal(out[~live], torch.zeros_like(out[~live])), "context_len 0 rows must be 0"
    assert_close(out[live], ref[live], dtype, f"decode heads={heads} D={head_dim} window={window}")


# odd lengths, page boundaries (15/16/17), a padded row (0), one long enough for many splits
DECODE_CTX = [0, 1, 15, 16, 17, 75, 150]


@pytest.mark.unit
@pytest.mark.parametrize("heads", GQA)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode(rand, poisoned, assert_close, dtype, heads):
    run_decode(rand, poisoned, assert_close, ctx_lens=DECODE_CTX, heads=heads, head_dim=64,
               page=16, dtype=dtype)


@pytest.mark.unit
@pytest.mark.parametrize(
    "dtype,heads,head_dim,page,window",
    [
        (torch.float32, (8, 2), 128, 8, None),
        (torch.bfloat16, (8, 1), 80, 16, None),  # head_dim padded to 128 with masks
        (torch.float32, (8, 2), 64, 16, 1),  # window 1: only the token itself
        (torch.float16, (4, 4), 64, 8, 20),
        (torch.bfloat16, (8, 1), 96, 16, 33),
    ],
)
def test_decode_head_dims_pages_windows(rand, poisoned, assert_close, dtype, heads, head_dim,
                                        page, window):
    run_decode(rand, poisoned, assert_close, ctx_lens=[0, 3, 16, 33, 40, 129], heads=heads,
               head_dim=head_dim, page=page, dtype=dtype, window=window)


@pytest.mark.unit
@pytest.mark.parametrize("block_n,num_splits", [(16, 1), (16, 5), (32, 3), (16, 12)])
@pytest.mark.parametrize("window", [None, 24])
def test_decode_split_configs(rand, poisoned, assert_close, block_n, num_splits, window):
    """Pinned configurations: single pass, uneven splits, more splits than key tiles."""
    run_decode(rand, poisoned, assert_close, ctx_lens=[0, 1, 31, 32, 33, 100], heads=(8, 2),
               head_dim=64, page=16, dtype=torch.float32, window=window,
               config=(block_n, num_splits, 4, 2))


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 24])
def test_decode_fp8_cache(rand, poisoned, assert_close, dtype, window):
    run_decode(rand, poisoned, assert_close, ctx_lens=DECODE_CTX, heads=(8, 2), head_dim=64,
               page=16, dtype=dtype, window=window, fp8_cache=True)


@pytest.mark.unit
def test_decode_grid_ignores_context_lens(rand, poisoned, monkeypatch, device):
    """The launch grid and workspace must depend on shapes only (CUDA-graph replay)."""
    launches = []

    class Recorder:  # records each launch's grid, tensor shapes (workspace) and constexprs
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
                launches.append((grid, shapes, sorted(kwargs.items())))
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(pa, "_decode_split_kernel", Recorder(pa._decode_split_kernel))
    monkeypatch.setattr(pa, "_decode_reduce_kernel", Recorder(pa._decode_reduce_kernel))
    k_cache, v_cache, table, _ = make_cache(rand, [200, 200], 1, 64, 16, torch.float32)
    q = rand(2, 8, 64)
    seen = []
    for lens in ([200, 200], [1, 0], [0, 0], [17, 130]):
        launches.clear()
        ctx = torch.tensor(lens, dtype=torch.int32, device=device)
        out = poisoned(q.shape, q.dtype)
        pa.paged_attention_decode(q, k_cache, v_cache, ctx, table, 0.1, out=out)
        seen.append(list(launches))
    assert len(seen[0]) == 2 and seen[0][0][0][1] > 1, "expected a split launch and a reduction"
    assert all(s == seen[0] for s in seen), f"launches differ with context_lens: {seen}"


@pytest.mark.unit
def test_decode_rejects_bad_inputs(rand, device):
    k_cache, v_cache, table, ctx = make_cache(rand, [5, 9], 2, 64, 16, torch.float32)
    q = rand(2, 8, 64)
    call = pa.paged_attention_decode
    with pytest.raises(ValueError, match="dtype"):
        call(q.half(), k_cache, v_cache, ctx, table, 0.1)
    with pytest.raises(ValueError, match="multiple"):
        call(rand(2, 6, 64), rand(4, 16, 4, 64), rand(4, 16, 4, 64), ctx, table, 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        call(q, k_cache.transpose(1, 2), v_cache.transpose(1, 2), ctx, table, 0.1)
    with pytest.raises(ValueError, match="power of two"):
        call(q, rand(4, 12, 2, 64), rand(4, 12, 2, 64), ctx, table, 0.1)
    with pytest.raises(ValueError, match="block_tables"):
        call(q, k_cache, v_cache, ctx, table.float(), 0.1)
    with pytest.raises(ValueError, match="out"):
        call(q, k_cache, v_cache, ctx, table, 0.1, out=torch.empty_like(q, dtype=torch.float16))
    with pytest.raises(ValueError, match="sliding_window"):
        call(q, k_cache, v_cache, ctx, table, 0.1, sliding_window=0)
    with pytest.raises(ValueError, match="context_lens"):
        call(q[:1], k_cache, v_cache, ctx, table, 0.1)
    with pytest.raises(ValueError, match="scale"):
        call(q, k_cache, v_cache, ctx, table, -0.1)


# --------------------------------------------------------------------------------- prefill

def run_prefill(rand, poisoned, assert_close, *, seqs, heads, head_dim, page, dtype,
                window=None, config=None, strided_q=False, fp8_cache=False):
    """seqs: [(q_len, context_len)]; the q_len new tokens are the last of the context."""
    num_q_heads, num_kv_heads = heads
    q_lens = [s[0] for s in seqs]
    k_cache, v_cache, table, ctx = make_cache(
        rand, [s[1] for s in seqs], num_kv_heads, head_dim, page, dtype)
    if fp8_cache:
        k_cache, v_cache = k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn)
    device = k_cache.device
    cu = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=device)
    num_tokens = sum(q_lens)
    if strided_q:  # q as a view into a fused [T, (Hq + 2 Hkv) * D] QKV output
        qkv = rand(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
        q = qkv[:, : num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)
    else:
        q = rand(num_tokens, num_q_heads, head_dim, dtype=dtype)
    scale = head_dim ** -0.5
    out = poisoned(q.shape, dtype)
    args = (q, k_cache, v_cache, cu, ctx, table, max(q_lens), scale, window)
    if config is None:
        pa.paged_attention(*args, out=out)
    else:
        pa._launch_prefill(*args, out, *config)
    ref = pa.paged_attention_reference(*upcast(q, k_cache, v_cache), cu, ctx, table, max(q_lens),
                                       scale, window)
    assert_close(out, ref, dtype, f"prefill heads={heads} D={head_dim} window={window}")


# full prefills, prefixes already cached, a decode row, page and tile boundaries, odd lengths
PREFILL_SEQS = [(37, 37), (1, 20), (16, 48), (50, 50), (5, 133)]


@pytest.mark.unit
@pytest.mark.parametrize("heads", [(2, 2), (4, 1), (8, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill(rand, poisoned, assert_close, dtype, heads):
    run_prefill(rand, poisoned, assert_close, seqs=PREFILL_SEQS, heads=heads, head_dim=64,
                page=16, dtype=dtype)


@pytest.mark.unit
@pytest.mark.parametrize(
    "dtype,heads,head_dim,page,window",
    [
        (torch.float32, (4, 1), 128, 8, None),
        (torch.bfloat16, (4, 2), 80, 16, None),
        (torch.float32, (4, 1), 64, 16, 1),
        (torch.float32, (4, 4), 64, 16, 8),
        (torch.float16, (4, 2), 96, 8, 17),
        (torch.bfloat16, (4, 1), 64, 16, 40),
    ],
)
def test_prefill_head_dims_pages_windows(rand, poisoned, assert_close, dtype, heads, head_dim,
                                         page, window):
    run_prefill(rand, poisoned, assert_close, seqs=PREFILL_SEQS, heads=heads, head_dim=head_dim,
                page=page, dtype=dtype, window=window)


@pytest.mark.unit
@pytest.mark.parametrize(
    "config", [(16, 16, 4, 1), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 2)]
)
@pytest.mark.parametrize("window", [None, 19])
def test_prefill_tile_configs(rand, poisoned, assert_close, config, window):
    """The GPU tile shapes, run here too: the skip/mask ranges depend on BLOCK_M and BLOCK_N."""
    run_prefill(rand, poisoned, assert_close, seqs=[(100, 100), (3, 90), (64, 64), (65, 130)],
                heads=(2, 1), head_dim=64, page=16, dtype=torch.float32, window=window,
                config=config)


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_fp8_cache(rand, poisoned, assert_close, dtype):
    run_prefill(rand, poisoned, assert_close, seqs=PREFILL_SEQS, heads=(4, 1), head_dim=64,
                page=16, dtype=dtype, fp8_cache=True)


@pytest.mark.unit
def test_prefill_strided_q(rand, poisoned, assert_close):
    run_prefill(rand, poisoned, assert_close, seqs=[(9, 30), (21, 21)], heads=(4, 2),
                head_dim=64, page=16, dtype=torch.float16, strided_q=True)


@pytest.mark.unit
def test_prefill_matches_decode_for_single_tokens(rand, device):
    """q_len == 1 everywhere: the prefill kernel computes the decode function."""
    k_cache, v_cache, table, ctx = make_cache(rand, [5, 16, 47], 2, 64, 16, torch.float32)
    q = rand(3, 8, 64)
    cu = torch.arange(4, dtype=torch.int32, device=device)
    prefill = pa.paged_attention(q, k_cache, v_cache, cu, ctx, table, 1, 0.125)
    decode = pa.paged_attention_decode(q, k_cache, v_cache, ctx, table, 0.125)
    assert torch.allclose(prefill, decode, rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_prefill_rejects_bad_cu_seqlens(rand, device):
    k_cache, v_cache, table, ctx = make_cache(rand, [5, 9], 2, 64, 16, torch.float32)
    q = rand(14, 4, 64)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        pa.paged_attention(q, k_cache, v_cache, torch.tensor([0, 5], device=device), ctx, table,
                           9, 0.1)


@pytest.mark.unit
def test_padded_head_dim_reads_nothing_past_the_cache(rand, poisoned, assert_close, device):
    """head_dim 80 runs as 128 columns: the masks must stop the last head of the last slot from
    reading past the cache, here into NaN placed right after it."""
    page, num_kv_heads, head_dim, num_blocks = 16, 2, 80, 3
    size = num_blocks * page * num_kv_heads * head_dim
    caches = []
    for _ in range(2):
        buf = torch.full((size + 1024,), float("nan"), device=device)
        buf[:size] = rand(size)
        caches.append(buf[:size].view(num_blocks, page, num_kv_heads, head_dim))
    k_cache, v_cache = caches
    # the last block first: prefill reads it in both unmasked (rows 32+) and masked tiles
    table = torch.tensor([[num_blocks - 1, 0, 1]], dtype=torch.int32, device=device)
    ctx = torch.tensor([48], dtype=torch.int32, device=device)  # every slot of every block
    q = rand(1, 4, head_dim)
    ref = pa.paged_attention_decode_reference(q, k_cache, v_cache, ctx, table, 0.1)
    out = poisoned(q.shape, q.dtype)
    pa.paged_attention_decode(q, k_cache, v_cache, ctx, table, 0.1, out=out)
    assert_close(out, ref, torch.float32, "decode")
    q = rand(48, 4, head_dim)
    cu = torch.tensor([0, 48], dtype=torch.int32, device=device)
    ref = pa.paged_attention_reference(q, k_cache, v_cache, cu, ctx, table, 48, 0.1)
    out = poisoned(q.shape, q.dtype)
    pa.paged_attention(q, k_cache, v_cache, cu, ctx, table, 48, 0.1, out=out)
    assert_close(out, ref, torch.float32, "prefill")


# ------------------------------------------------------------------------------ GPU shapes

@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("heads", [(32, 32), (32, 8), (32, 4)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_gpu(rand, poisoned, assert_close, dtype, heads):
    # batch 64 of mixed lengths (padded rows, page edges, long), then batch 3 out to 16k
    gen = rand.generator
    mixed = [0, 1, 15, 16, 17, 255, 256, 257, 1000, 4095] + torch.randint(
        1, 4096, (54,), generator=gen).tolist()
    run_decode(rand, poisoned, assert_close, ctx_lens=mixed, heads=heads, head_dim=128,
               page=16, dtype=dtype)
    run_decode(rand, poisoned, assert_close, ctx_lens=[16384, 1023, 9000], heads=heads,
               head_dim=128, page=16, dtype=dtype)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("head_dim,window", [(64, None), (128, 4096), (256, None), (80, 1000)])
def test_decode_gpu_head_dims_windows(rand, poisoned, assert_close, head_dim, window):
    run_decode(rand, poisoned, assert_close, ctx_lens=[0, 7, 4096, 5000, 16000, 333],
               heads=(32, 8), head_dim=head_dim, page=16, dtype=torch.bfloat16, window=window)


@pytest.mark.gpu
@requires_cuda
def test_decode_gpu_float32(rand, poisoned, assert_close):
    run_decode(rand, poisoned, assert_close, ctx_lens=[0, 1, 100, 3000], heads=(32, 8),
               head_dim=128, page=16, dtype=torch.float32)


@pytest.mark.gpu
@requires_cuda
def test_decode_cuda_graph_replay(rand, device):
    """Captured once, replayed with other context lengths and block tables."""
    batch, heads, head_dim, page = 8, (32, 8), 128, 16
    k_cache, v_cache, table, ctx = make_cache(rand, [4096] * batch, heads[1], head_dim, page,
                                              torch.bfloat16)
    q = rand(batch, heads[0], head_dim, dtype=torch.bfloat16)
    out = torch.empty_like(q)

    def call():
        pa.paged_attention_decode(q, k_cache, v_cache, ctx, table, 0.088, out=out)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    gen = rand.generator
    for lens in ([4096] * batch, [0, 1, 17, 4095, 100, 2048, 3, 999]):
        ctx.copy_(torch.tensor(lens, dtype=torch.int32))
        table.copy_(table[torch.randperm(batch, generator=gen)])
        q.copy_(rand(*q.shape, dtype=q.dtype))
        out.fill_(float("nan"))
        graph.replay()
        ref = pa.paged_attention_decode_reference(*upcast(q, k_cache, v_cache), ctx, table, 0.088)
        live = ctx > 0
        assert torch.equal(out[~live], torch.zeros_like(out[~live]))
        err = ((out[live].float() - ref[live]).norm() / ref[live].norm()).item()
        assert err <= 1e-2, f"graph replay with context_lens {lens}: relative error {err:.2e}"


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("heads", [(32, 32), (32, 8), (32, 4)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_gpu(rand, poisoned, assert_close, dtype, heads):
    seqs = [(1024, 1024), (1, 700), (500, 4000), (129, 129), (700, 6000), (37, 37)]
    run_prefill(rand, poisoned, assert_close, seqs=seqs, heads=heads, head_dim=128, page=16,
                dtype=dtype)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("head_dim,window,dtype", [
    (64, None, torch.bfloat16), (128, 1024, torch.bfloat16), (256, None, torch.float16),
    (80, 333, torch.bfloat16), (128, None, torch.float32),
])
def test_prefill_gpu_head_dims_windows(rand, poisoned, assert_close, head_dim, window, dtype):
    seqs = [(1024, 1024), (300, 3000), (7, 7), (16, 4100)]
    run_prefill(rand, poisoned, assert_close, seqs=seqs, heads=(32, 8), head_dim=head_dim,
                page=16, dtype=dtype, window=window)


@pytest.mark.gpu
@requires_cuda
def test_prefill_gpu_short_queries(rand, poisoned, assert_close):
    """max_seqlen_q <= 16 (chunked-prefill tails): the BLOCK_M=16 configuration."""
    run_prefill(rand, poisoned, assert_close, seqs=[(16, 3000), (4, 40), (1, 1), (9, 2049)],
                heads=(32, 8), head_dim=128, page=16, dtype=torch.bfloat16)

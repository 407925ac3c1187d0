"""lora_shrink / lora_expand (Triton) against their pure-torch references."""
import os
import subprocess
import sys

import pytest
import torch

from textgen_kernels import lora

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
NUM_SLOTS = 3
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# the interpreter trips a numpy deprecation in its own scalar handling
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")

# (slot_of_token, K, R, N): one row with and one without an adapter, mixed batches with
# repeated slots, with and without base-model rows, and one past the launchers' block caps.
CASES = [
    ([1], 16, 4, 24),
    ([-1], 40, 8, 24),
    ([2, -1, 0, 2, -1], 40, 12, 48),
    ([0, 0, 1, 2, 1], 16, 8, 48),
    # past the block caps: several K chunks (with a tail, two K splits), rank and column blocks
    ([2, -1, 0, 2, -1], 300, 80, 200),
    # few tokens, long K: four K splits, the last one past K's end
    ([0, -1], 1000, 8, 40),
]


def skip_interpreted_bf16_dots(dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter's tl.dot is wrong for bfloat16 (it returns ~1e10 "
                    "for 16 x 16 products of randn); test_lora_gpu covers the tiles in bfloat16")


@pytest.fixture(params=["per token", "tiles"])
def kernel_path(request, monkeypatch):
    """Runs a test through the per-token kernels and through the tile kernels (prefills)."""
    if request.param == "tiles":
        skip_interpreted_bf16_dots(request.node.callspec.params.get("dtype"))
    monkeypatch.setattr(lora, "TILE_MIN_TOKENS", 10**9 if request.param == "per token" else 1)
    return request.param


def slots_tensor(slots, device):
    return torch.tensor(slots, dtype=torch.int32, device=device)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (torch.equal takes -0.0 for 0.0 and never NaN for NaN)."""
    return a.shape == b.shape and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def make_a_slots(rand, num_slots, rank, k, dtype):
    """Random A matrices; slot 1 holds a lower-rank adapter padded to R with zero rows."""
    a_slots = rand(num_slots, rank, k, dtype=dtype)
    if num_slots > 1:
        a_slots[1, rank // 2:] = 0
    return a_slots


def make_out(rand, slots, n, dtype):
    """Random out with -0.0 sprinkled over the rows without an adapter: a rewrite of old + 0
    would turn them into +0.0, so bit equality shows that those rows were not written."""
    out = rand(len(slots), n, dtype=dtype)
    out[slots < 0, ::3] = -0.0
    return out


def run_shrink(rand, poisoned, assert_close, *, slots, k, rank, dtype, num_slots=NUM_SLOTS):
    x = rand(len(slots), k, dtype=dtype)
    a_slots = make_a_slots(rand, num_slots, rank, k, dtype)
    splits = lora.lora_shrink_splits(len(slots), k, rank)
    h = poisoned((splits, len(slots), rank), torch.float32)
    assert lora.lora_shrink(x, a_slots, slots, out=h) is h
    ref = lora.lora_shrink_reference(x.float(), a_slots.float(), slots)
    assert_close(h.sum(0), ref[0], dtype, "lora_shrink")
    assert (h[:, slots < 0] == 0).all(), "rows without an adapter must be zero"
    return splits


def run_expand(rand, assert_close, *, slots, n, rank, dtype, num_slots=NUM_SLOTS, splits=2):
    out0 = make_out(rand, slots, n, dtype)
    h = rand(splits, len(slots), rank)
    b_slots = rand(num_slots, n, rank, dtype=dtype)
    out = out0.clone()
    assert lora.lora_expand(out, h, b_slots, slots) is out
    ref = lora.lora_expand_reference(out0.float(), h, b_slots.float(), slots)
    assert_close(out, ref, dtype, "lora_expand")
    base = slots < 0
    assert same_bits(out[base], out0[base]), "rows without an adapter were modified"
    return out0, h, b_slots, out


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slots,k,rank,n", CASES)
def test_lora_shrink(rand, poisoned, assert_close, device, dtype, kernel_path, slots, k, rank, n):
    splits = run_shrink(rand, poisoned, assert_close, slots=slots_tensor(slots, device), k=k,
                        rank=rank, dtype=dtype)
    assert splits == {16: 1, 40: 1, 300: 2, 1000: 4}[k]


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slots,k,rank,n", CASES)
def test_lora_expand(rand, assert_close, device, dtype, kernel_path, slots, k, rank, n):
    slots = slots_tensor(slots, device)
    out0, h, b_slots, out = run_expand(rand, assert_close, slots=slots, n=n, rank=rank,
                                       dtype=dtype)
    # the reference returns a new tensor and leaves its `out` alone; in out's dtype it rounds
    # once, as the kernel does
    before = out0.clone()
    ref = lora.lora_expand_reference(out0, h, b_slots, slots)
    assert ref is not out0 and same_bits(out0, before)
    assert_close(out, ref.float(), dtype, "lora_expand vs reference in out's dtype")


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_expand_into_column_slice(rand, assert_close, device, dtype, kernel_path):
    """out is columns [8, 8 + N) of a wider fused-projection output: the rest stays untouched."""
    slots = slots_tensor([2, -1, 0, 2, -1], device)
    n, rank = 24, 12
    wide = rand(len(slots), 8 + n + 40, dtype=dtype)
    wide[slots < 0, 8::5] = -0.0
    before = wide.clone()
    view = wide[:, 8: 8 + n]
    h = rand(1, len(slots), rank)
    b_slots = rand(NUM_SLOTS, n, rank, dtype=dtype)
    lora.lora_expand(view, h, b_slots, slots)
    ref = lora.lora_expand_reference(before[:, 8: 8 + n].float(), h, b_slots.float(), slots)
    assert_close(view, ref, dtype, "lora_expand into a column slice")
    assert same_bits(wide[:, :8], before[:, :8]), "columns before the slice were written"
    assert same_bits(wide[:, 8 + n:], before[:, 8 + n:]), "columns after the slice were written"
    assert same_bits(wide[slots < 0], before[slots < 0]), "rows without an adapter were written"


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_shrink_strided_rows(rand, poisoned, assert_close, device, dtype, kernel_path):
    """x is a column slice of a wider tensor, and h goes into columns of a wider buffer."""
    slots = slots_tensor([1, -1, 2, 1, 0], device)
    k, rank = 40, 12
    x = rand(len(slots), k + 24, dtype=dtype)[:, 8: 8 + k]
    a_slots = make_a_slots(rand, NUM_SLOTS, rank, k, dtype)
    buf = poisoned((1, len(slots), rank + 8), torch.float32)
    lora.lora_shrink(x, a_slots, slots, out=buf[:, :, 4: 4 + rank])
    ref = lora.lora_shrink_reference(x.float(), a_slots.float(), slots)
    assert_close(buf[:, :, 4: 4 + rank], ref, dtype, "lora_shrink with row strides")
    assert buf[..., :4].isnan().all() and buf[..., 4 + rank:].isnan().all(), "wrote outside out"


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_tiles_of_mixed_prompts(rand, poisoned, assert_close, device, dtype, monkeypatch):
    """A prefill-sized batch through the tile kernels: prompts of one adapter each (runs of
    slots crossing tile edges), base-model prompts, then decode rows of mixed adapters, and a
    last partial tile."""
    skip_interpreted_bf16_dots(dtype)
    monkeypatch.setattr(lora, "TILE_MIN_TOKENS", 64)
    slots = [0] * 20 + [-1] * 13 + [2] * 40 + [1] * 5 + [2, 0, -1, 1, 1, 0, 2, -1, 0]
    slots = slots_tensor(slots, device)
    run_shrink(rand, poisoned, assert_close, slots=slots, k=300, rank=24, dtype=dtype)
    run_expand(rand, assert_close, slots=slots, n=80, rank=24, dtype=dtype)


@pytest.mark.unit
def test_lora_no_tokens(rand, device):
    slots = slots_tensor([], device)
    h = lora.lora_shrink(rand(0, 16), rand(NUM_SLOTS, 8, 16), slots)
    assert h.shape == (1, 0, 8) and h.dtype == torch.float32
    out = rand(0, 24)
    assert lora.lora_expand(out, h, rand(NUM_SLOTS, 24, 8), slots) is out


@pytest.mark.unit
def test_lora_rejects_bad_inputs(rand, device):
    x, a_slots = rand(5, 16), rand(NUM_SLOTS, 8, 16)
    slots = slots_tensor([0, -1, 1, 2, 0], device)
    out, h, b_slots = rand(5, 24), rand(1, 5, 8), rand(NUM_SLOTS, 24, 8)
    with pytest.raises(ValueError, match="a_slots must be \\[S, R, 16\\]"):
        lora.lora_shrink(x, rand(NUM_SLOTS, 8, 12), slots)
    with pytest.raises(ValueError, match="a_slots.dtype"):
        lora.lora_shrink(x, a_slots.half(), slots)
    with pytest.raises(ValueError, match="x.dtype"):
        lora.lora_shrink(x.double(), a_slots.double(), slots)
    with pytest.raises(ValueError, match="x's last dim"):
        lora.lora_shrink(rand(16, 5).t(), a_slots, slots)
    with pytest.raises(ValueError, match="slot_of_token must be int32"):
        lora.lora_shrink(x, a_slots, slots.long())
    with pytest.raises(ValueError, match="slot_of_token must be int32"):
        lora.lora_shrink(x, a_slots, slots[:4])
    with pytest.raises(ValueError, match="out must be"):
        lora.lora_shrink(x, a_slots, slots, out=rand(5, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="h.dtype must be float32"):
        lora.lora_expand(out, h.half(), b_slots, slots)
    with pytest.raises(ValueError, match="b_slots must be \\[S, 24, 8\\]"):
        lora.lora_expand(out, h, rand(NUM_SLOTS, 24, 4), slots)
    with pytest.raises(ValueError, match="b_slots.dtype"):
        lora.lora_expand(out, h, b_slots.bfloat16(), slots)
    with pytest.raises(ValueError, match="out's last dim"):
        lora.lora_expand(rand(24, 5).t(), h, b_slots, slots)
    with pytest.raises(ValueError, match="slot_of_token must be int32"):
        lora.lora_expand(out, h, b_slots, slots.long())
    with pytest.raises(ValueError, match="h must be \\[splits, T, R\\]"):
        lora.lora_expand(out, h[0], b_slots, slots)
    with pytest.raises(ValueError, match="shard_starts must be"):
        lora.lora_expand(out, h, b_slots, slots, (0, 30))
    with pytest.raises(ValueError, match="shard_starts must be"):
        lora.lora_expand(out, h, b_slots, slots, (0, 8, 16))  # rank 8 over 3 shards
    with pytest.raises(ValueError, match="shared_ranks must be int32"):
        lora.lora_expand(out, h, b_slots, slots, (0, 8))


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_expand_reads_each_shards_own_ranks(rand, assert_close, device, dtype, kernel_path):
    """A fused projection's output columns [0, 16), [16, 24), [24, 40) are shards with ranks
    [0, 4), [4, 8), [8, 12) each, unless the slot's adapter shares its ranks (trained on the
    fused projection, slot 1 here). B is random everywhere: ranks outside a shard's own are
    never read (they are zero in real slots)."""
    slots = slots_tensor([2, -1, 0, 1, 1, 0], device)
    # the tiles need shards of 16 columns and more: (0, 32, 48) of 64 there
    starts, n, rank = ((0, 16, 24), 40, 12) if kernel_path == "per token" else ((0, 32, 48), 64, 12)
    shared = torch.tensor([0, 1, 0], dtype=torch.int32, device=device)
    out0 = make_out(rand, slots, n, dtype)
    h = rand(3, len(slots), rank)
    b_slots = rand(NUM_SLOTS, n, rank, dtype=dtype)
    out = lora.lora_expand(out0.clone(), h, b_slots, slots, starts, shared)
    ref = lora.lora_expand_reference(out0.float(), h, b_slots.float(), slots, starts, shared)
    assert_close(out, ref, dtype, "lora_expand by shards")
    unsharded = lora.lora_expand_reference(out0.float(), h, b_slots.float(), slots)
    sharded_rows = (slots == 0) | (slots == 2)
    assert not torch.allclose(ref[sharded_rows], unsharded[sharded_rows])
    assert torch.equal(ref[slots == 1], unsharded[slots == 1])


# Run in a process of its own: under TRITON_INTERPRET the kernels (and the helpers they call)
# are interpreted functions, which Triton's compiler does not take.
_COMPILE_FOR_HOPPER = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from textgen_kernels import lora

dtype = sys.argv[1]
kernels = {
    lora._lora_shrink_kernel: {"BLOCK_R": 64, "BLOCK_K": 128},
    lora._lora_expand_kernel: {"BLOCK_N": 128, "BLOCK_R": 16, "SHARDED": True},
    lora._lora_shrink_tiles_kernel: {"BLOCK_T": 32, "BLOCK_R": 64, "BLOCK_K": 128,
                                     "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"},
    lora._lora_expand_tiles_kernel: {"BLOCK_T": 32, "BLOCK_N": 64, "BLOCK_R": 16,
                                     "SHARDED": True},
}
pointers = {"h_ptr": "*fp32", "slot_ptr": "*i32", "shared_ptr": "*i32"}
for kernel, constexprs in kernels.items():
    signature = {name: "constexpr" if name in constexprs
                 else pointers.get(name, f"*{dtype}") if name.endswith("_ptr") else "i32"
                 for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["ptx"], kernel
"""


@pytest.mark.unit
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_lora_kernels_compile_for_hopper(dtype):
    """The CPU runs the kernels interpreted, which never compiles them: Triton's own compiler
    (its bundled ptxas) builds each one for sm_90 here, so a kernel that cannot compile fails
    before a GPU run does."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER, dtype], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lora_gpu(rand, poisoned, assert_close, device, dtype):
    """Llama-3-8B's fused QKV projection: K 4096 -> N 6144, rank 16 for each of q, k, v."""
    num_tokens, k, rank, n, num_slots = 64, 4096, 16 * 3, 6144, 8
    slots = torch.randint(-1, num_slots, (num_tokens,), generator=rand.generator)
    slots = slots.to(torch.int32).to(device)
    assert run_shrink(rand, poisoned, assert_close, slots=slots, k=k, rank=rank, dtype=dtype,
                      num_slots=num_slots) == 16
    run_expand(rand, assert_close, slots=slots, n=n, rank=rank, dtype=dtype,
               num_slots=num_slots, splits=16)
    starts = (0, 4096, 5120)  # q, k, v; slot 3's adapter was trained on the fused projection
    shared = (torch.arange(num_slots) == 3).to(torch.int32).to(device)
    out0 = make_out(rand, slots, n, dtype)
    h = rand(16, num_tokens, rank)
    b_slots = rand(num_slots, n, rank, dtype=dtype)
    out = lora.lora_expand(out0.clone(), h, b_slots, slots, starts, shared)
    ref = lora.lora_expand_reference(out0.float(), h, b_slots.float(), slots, starts, shared)
    assert_close(out, ref, dtype, "lora_expand by shards")
    # a prefill: 1,000 tokens of prompts of one adapter each, through the tile kernels
    prompts = torch.randint(0, 40, (20,), generator=rand.generator).tolist()
    slots = torch.tensor([s if s < num_slots else -1 for s in prompts], dtype=torch.int32)
    slots = slots.repeat_interleave(50).to(device)
    assert len(slots) >= lora.TILE_MIN_TOKENS
    run_shrink(rand, poisoned, assert_close, slots=slots, k=k, rank=rank, dtype=dtype,
               num_slots=num_slots)
    run_expand(rand, assert_close, slots=slots, n=n, rank=rank, dtype=dtype,
               num_slots=num_slots)

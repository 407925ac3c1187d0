"""Multi-LoRA for heterogeneous batches (LoRAX / punica "BGMV"): every token row of a packed
batch goes through the adapter in its own GPU slot, or through none.

A LoRA adds x @ A.T @ B.T to a projection's output. It runs in two steps:
  lora_shrink   h[:, t] = x[t] @ A[slot[t]].T     x [T, K] -> h [splits, T, R] float32
  lora_expand   out[t] += h[:, t].sum(0) @ B[slot[t]].T    h -> out [T, N] (in place)
Layout: the loaded adapters sit in slots, a_slots [S, R, K] and b_slots [S, N, R] (nn.Linear's
[out, in] layout), every adapter's rank padded to the common R with zero rows of A (and zero
columns of B), so that the padding adds exactly zero. slot_of_token [T] int32 holds each row's
slot, -1 for rows that use the base model alone. Slots must be < S; that is not checked (it
would need a sync with the host).

The shrink splits K: one program per (token, rank block, K split) writes a partial sum, and the
expand adds the partial sums up as it reads h. A decode batch has few tokens, so one program per
token reading all of K left most of the GPU idle (the first GPU run: 84-132 us per projection at
batch 64, 9 ms of a 17.5 ms step); the split keeps the sum's order fixed (no atomics), so
results do not vary from run to run.

A fused projection (qkv, gate_up) gives each output shard its own rank range, and B is zero
outside it: given the shards' first output columns, the expand reads only the shard's ranks
(a third of B for qkv, half for gate_up).

Below TILE_MIN_TOKENS tokens, per token (batched GEMV, "BGMV"), not per adapter (segmented
GEMM): the batch needs no sorting by adapter, any mix of adapters costs one launch, and at decode
sizes (a handful of rows per adapter, R <= a few hundred) the kernels are bound by reading A and
B, which tensor cores would not speed up. Each program reads its row's slot first and exits at
once when it is -1: base-model rows cost (almost) nothing, and since the grid depends on T alone,
a CUDA graph captured once over a static slot buffer serves every later mix of adapters,
including none.

From TILE_MIN_TOKENS tokens on (prefills), per tile of TILE_T consecutive tokens: a prompt's
tokens are consecutive and share their adapter, so a tile reads A or B once per distinct slot in
it (tensor-core dots over the tile's rows of that slot) instead of once per token; per token, a
8,192-token prefill re-read each projection's A 8,192 times.
"""
import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def lora_shrink_reference(
    x: torch.Tensor, a_slots: torch.Tensor, slot_of_token: torch.Tensor
) -> torch.Tensor:
    """x [T, K], a_slots [S, R, K], slot_of_token [T] int32 (-1: no adapter) -> [1, T, R]
    float32 (one "split"): x[t] @ a_slots[slot_of_token[t]].T, zeros where the slot is -1.
    Computed in float32, one matmul per slot in use (unique() syncs with the host)."""
    h = torch.zeros(1, x.shape[0], a_slots.shape[1], dtype=torch.float32, device=x.device)
    for slot in slot_of_token.unique().tolist():
        if slot < 0:
            continue
        rows = slot_of_token == slot
        h[0, rows] = x[rows].float() @ a_slots[slot].float().t()
    return h


def lora_expand_reference(
    out: torch.Tensor, h: torch.Tensor, b_slots: torch.Tensor, slot_of_token: torch.Tensor,
    shard_starts: tuple[int, ...] = (0,), shared_ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """out [T, N], h [splits, T, R] float32 (summed over splits), b_slots [S, N, R] -> a new
    tensor: out + h[t] @ b_slots[slot].T on the rows that have a slot (the others copied
    unchanged), computed in float32 and cast to out.dtype. `out` itself is not modified.
    shard_starts, shared_ranks: see lora_expand (B outside a shard's ranks taken as zero)."""
    if len(shard_starts) > 1:
        own = shard_mask(shard_starts, b_slots.shape[1], b_slots.shape[2]).to(b_slots.device)
        shared = shared_ranks.to(b_slots.device).bool()[:, None, None]
        b_slots = torch.where(shared | own, b_slots, torch.zeros((), dtype=b_slots.dtype,
                                                                 device=b_slots.device))
    h = h.sum(0)
    result = out.clone()
    for slot in slot_of_token.unique().tolist():
        if slot < 0:
            continue
        rows = slot_of_token == slot
        delta = h[rows].float() @ b_slots[slot].float().t()
        result[rows] = (out[rows].float() + delta).to(out.dtype)
    return result


def shard_mask(shard_starts: tuple[int, ...], n: int, rank: int) -> torch.Tensor:
    """[N, R] bool: output column n of shard i uses ranks [i * R / shards, (i + 1) * R / shards)."""
    shards = len(shard_starts)
    shard_of = torch.zeros(n, dtype=torch.long)
    for start in shard_starts[1:]:
        shard_of += (torch.arange(n) >= start).long()
    return (torch.arange(rank) // (rank // shards))[None, :] == shard_of[:, None]


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, slot_ptr, h_ptr,
    K, R, K_PER_SPLIT, stride_x, stride_as, stride_ar, stride_hs, stride_h,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (token, chunk of BLOCK_R ranks, K split): h[split, t, r] = sum over the split's
    inputs k of x[t, k] * A[slot, r, k] in float32, BLOCK_K at a time (K_PER_SPLIT is a
    multiple of BLOCK_K). A row without an adapter only stores its zeros."""
    tok = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2)
    r_mask = offs_r < R
    h_row = h_ptr + split.to(tl.int64) * stride_hs + tok * stride_h
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:
        tl.store(h_row + offs_r, tl.zeros((BLOCK_R,), dtype=tl.float32), mask=r_mask)
        return
    x_row = x_ptr + tok * stride_x
    a_tile = a_ptr + slot * stride_as + offs_r[:, None].to(tl.int64) * stride_ar
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    k_start = split * K_PER_SPLIT
    for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        a = tl.load(a_tile + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.sum(a.to(tl.float32) * x[None, :], axis=1)
    tl.store(h_row + offs_r, acc, mask=r_mask)


@triton.jit
def _rank_range(n0, slot, shared_ptr, R, START1, START2, SHARD_R, SHARDED: tl.constexpr):
    """The ranks of B that output columns from n0 on (one shard) read for `slot`: all R, or,
    SHARDED and unless shared[slot] is 1, the shard's own SHARD_R (shards start at columns 0,
    START1, START2)."""
    r_start = n0 * 0
    r_end = r_start + R
    if SHARDED:
        own = 1 - tl.load(shared_ptr + slot)  # 1: this shard's ranks only
        shard = (n0 >= START1).to(tl.int32) + (n0 >= START2).to(tl.int32)
        r_start = own * shard * SHARD_R
        r_end = r_start + SHARD_R + (1 - own) * (R - SHARD_R)
    return r_start, r_end


@triton.jit
def _lora_expand_kernel(
    out_ptr, h_ptr, b_ptr, slot_ptr, shared_ptr,
    N, R, SPLITS, START1, START2, SHARD_R, stride_out, stride_hs, stride_h, stride_bs,
    stride_bn,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SHARDED: tl.constexpr,
):
    """One (token, chunk of BLOCK_N output columns, all in one shard): out[t, n] += sum over
    ranks r of (sum of h's SPLITS partial sums)[t, r] * B[slot, n, r], in float32 over BLOCK_R
    ranks at a time, added to out's value in float32 and rounded once to out's dtype. SHARDED:
    shards start at columns 0, START1, START2 (N when absent), and unless shared[slot] is 1 the
    slot's adapter gives each its own SHARD_R ranks (the only ones read). A row without an
    adapter is neither read nor written."""
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    r_start, r_end = _rank_range(n0, slot, shared_ptr, R, START1, START2, SHARD_R, SHARDED)
    h_row = h_ptr + tok * stride_h
    b_tile = b_ptr + slot * stride_bs + offs_n[:, None].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < r_end
        h = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for split in range(0, SPLITS):
            h += tl.load(h_row + split * stride_hs + offs_r, mask=r_mask, other=0.0)
        b = tl.load(b_tile + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        acc += tl.sum(b.to(tl.float32) * h[None, :], axis=1)
    out_row = out_ptr + tok * stride_out + offs_n
    old = tl.load(out_row, mask=n_mask, other=0.0)
    tl.store(out_row, (old.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _lora_shrink_tiles_kernel(
    x_ptr, a_ptr, slot_ptr, h_ptr,
    T, K, R, K_PER_SPLIT, stride_x, stride_as, stride_ar, stride_hs, stride_h,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One (tile of BLOCK_T tokens, chunk of BLOCK_R ranks, K split): for each distinct slot in
    the tile, the rows of that slot times A[slot] over the split's inputs, in float32 (a row
    without an adapter stays zero)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2)
    t_mask = offs_t < T
    r_mask = offs_r < R
    remaining = tl.load(slot_ptr + offs_t, mask=t_mask, other=-1)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    x_rows = x_ptr + offs_t[:, None].to(tl.int64) * stride_x
    k_start = split * K_PER_SPLIT
    while tl.max(remaining, axis=0) >= 0:
        slot = tl.max(remaining, axis=0)
        rows = remaining == slot
        a_cols = a_ptr + slot.to(tl.int64) * stride_as + offs_r[None, :].to(tl.int64) * stride_ar
        for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_rows + offs_k[None, :], mask=rows[:, None] & k_mask[None, :], other=0.0)
            a = tl.load(a_cols + offs_k[:, None], mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            acc += tl.dot(x, a, input_precision=DOT_PRECISION)
        remaining = tl.where(rows, -1, remaining)
    h_tile = (h_ptr + split.to(tl.int64) * stride_hs + offs_t[:, None].to(tl.int64) * stride_h
              + offs_r[None, :])
    tl.store(h_tile, acc, mask=t_mask[:, None] & r_mask[None, :])


@triton.jit
def _lora_expand_tiles_kernel(
    out_ptr, h_ptr, b_ptr, slot_ptr, shared_ptr,
    T, N, R, SPLITS, START1, START2, SHARD_R, stride_out, stride_hs, stride_h, stride_bs,
    stride_bn,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SHARDED: tl.constexpr,
):
    """One (tile of BLOCK_T tokens, chunk of BLOCK_N output columns in one shard): for each
    distinct slot in the tile, its rows' summed h times B[slot] (the shard's ranks, as in
    _lora_expand_kernel), in float32, added to out and rounded once; rows without an adapter
    are neither read nor written."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    t_mask = offs_t < T
    n_mask = offs_n < N
    slots = tl.load(slot_ptr + offs_t, mask=t_mask, other=-1)
    remaining = slots
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    h_rows = h_ptr + offs_t[:, None].to(tl.int64) * stride_h
    while tl.max(remaining, axis=0) >= 0:
        slot = tl.max(remaining, axis=0)
        rows = remaining == slot
        r_start, r_end = _rank_range(n0, slot, shared_ptr, R, START1, START2, SHARD_R, SHARDED)
        b_cols = b_ptr + slot.to(tl.int64) * stride_bs + offs_n[None, :].to(tl.int64) * stride_bn
        for r0 in range(r_start, r_end, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < r_end
            h = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
            for split in range(0, SPLITS):
                h += tl.load(h_rows + split * stride_hs + offs_r[None, :],
                             mask=rows[:, None] & r_mask[None, :], other=0.0)
            b = tl.load(b_cols + offs_r[:, None], mask=r_mask[:, None] & n_mask[None, :],
                        other=0.0)
            acc += tl.dot(h, b.to(tl.float32), input_precision="ieee")
        remaining = tl.where(rows, -1, remaining)
    out_tile = out_ptr + offs_t[:, None].to(tl.int64) * stride_out + offs_n[None, :]
    written = (t_mask & (slots >= 0))[:, None] & n_mask[None, :]
    old = tl.load(out_tile, mask=written, other=0.0)
    tl.store(out_tile, (old.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=written)


def _check_slots(slot_of_token: torch.Tensor, num_tokens: int) -> None:
    if slot_of_token.dtype != torch.int32 or slot_of_token.shape != (num_tokens,):
        raise ValueError(
            f"slot_of_token must be int32 [{num_tokens}], got {slot_of_token.dtype} "
            f"{tuple(slot_of_token.shape)}"
        )
    if not slot_of_token.is_contiguous():
        raise ValueError(f"slot_of_token must be contiguous, got strides {slot_of_token.stride()}")


def _check_devices(**tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        found = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        raise ValueError(f"all tensors must be on one device, got {found}")


# programs a shrink aims for: a few per SM on an H100/H200 (132 SMs), so that reading A is
# spread over the whole GPU
_SHRINK_PROGRAMS = 1024
_SHRINK_BLOCK_R = 64
_SHRINK_BLOCK_K = 128
TILE_MIN_TOKENS = 256  # from here on, tiles of consecutive tokens (prefills)
TILE_T = 32


def _row_blocks(num_tokens: int) -> int:
    return num_tokens if num_tokens < TILE_MIN_TOKENS else triton.cdiv(num_tokens, TILE_T)


def compile_token_counts(max_tokens: int, shapes: list[tuple[int, int]]) -> list[int]:
    """Token counts whose launches reach every variant Triton compiles of these kernels for
    steps of up to max_tokens tokens on projections of these (inputs K, rank capacity R):
    one count per variant, the smallest. A variant is what the count changes in a launch's
    compiled code: the path (tiles from TILE_MIN_TOKENS), and the classes Triton specializes
    integer arguments on (== 1, divisible by 16, neither) of the K splits, of h's row stride
    (count x R) and, on the tiles, of the count itself."""
    def kind(n: int) -> int:
        return 1 if n == 1 else 16 if n % 16 == 0 else 0

    counts, seen = set(), set()
    for k, rank in shapes:
        for count in range(1, max_tokens + 1):
            tiles = count >= TILE_MIN_TOKENS
            variant = (k, rank, tiles, kind(lora_shrink_splits(count, k, rank)),
                       kind(count) if tiles else None, kind(count * rank))
            if variant not in seen:
                seen.add(variant)
                counts.add(count)
    return sorted(counts)


def lora_shrink_splits(num_tokens: int, k: int, rank: int) -> int:
    """How many K splits lora_shrink uses for these sizes (a power of 2, at least one
    BLOCK_K of inputs each): its output is [splits, T, R]."""
    r_blocks = triton.cdiv(max(rank, 1), _SHRINK_BLOCK_R)
    block_k = min(triton.next_power_of_2(max(k, 16)), _SHRINK_BLOCK_K)
    splits = 1
    while (2 * splits * max(_row_blocks(num_tokens), 1) * r_blocks <= _SHRINK_PROGRAMS
           and 2 * splits * block_k <= k):
        splits *= 2
    return splits


def lora_shrink(
    x: torch.Tensor,
    a_slots: torch.Tensor,
    slot_of_token: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of lora_shrink_reference: x [T, K] -> h [splits, T, R] float32, partial
    sums over K splits (lora_shrink_splits; zero rows where the slot is -1), written into
    `out` when given.

    x and a_slots share one dtype; their last dims must be contiguous (x may have any row
    stride, e.g. a column slice of a wider tensor), as must out's.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [T, K], got {tuple(x.shape)}")
    if a_slots.dim() != 3:
        raise ValueError(f"a_slots must be [S, R, K], got {tuple(a_slots.shape)}")
    num_tokens, k = x.shape
    _, rank, a_k = a_slots.shape
    if a_k != k:
        raise ValueError(f"a_slots must be [S, R, {k}] for x [T, {k}], got {tuple(a_slots.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x.dtype must be one of {_DTYPES}, got {x.dtype}")
    if a_slots.dtype != x.dtype:
        raise ValueError(f"a_slots.dtype must be x's {x.dtype}, got {a_slots.dtype}")
    if x.stride(1) != 1 and k > 1:
        raise ValueError(f"x's last dim must be contiguous, got strides {x.stride()}")
    if a_slots.stride(2) != 1 and k > 1:
        raise ValueError(f"a_slots's last dim must be contiguous, got strides {a_slots.stride()}")
    _check_slots(slot_of_token, num_tokens)
    splits = lora_shrink_splits(num_tokens, k, rank)
    if out is None:
        out = torch.empty(splits, num_tokens, rank, dtype=torch.float32, device=x.device)
    if out.shape != (splits, num_tokens, rank) or out.dtype != torch.float32:
        raise ValueError(
            f"out must be [{splits}, {num_tokens}, {rank}] float32, got {tuple(out.shape)} "
            f"{out.dtype}"
        )
    if out.stride(2) != 1 and rank > 1:
        raise ValueError(f"out's last dim must be contiguous, got strides {out.stride()}")
    _check_devices(x=x, a_slots=a_slots, slot_of_token=slot_of_token, out=out)
    if num_tokens == 0 or rank == 0:
        return out
    block_k = min(triton.next_power_of_2(max(k, 16)), _SHRINK_BLOCK_K)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    if num_tokens >= TILE_MIN_TOKENS:
        block_r = min(triton.next_power_of_2(max(rank, 16)), _SHRINK_BLOCK_R)
        _lora_shrink_tiles_kernel[(triton.cdiv(num_tokens, TILE_T), triton.cdiv(rank, block_r),
                                   splits)](
            x, a_slots, slot_of_token, out,
            num_tokens, k, rank, k_per_split, x.stride(0), a_slots.stride(0),
            a_slots.stride(1), out.stride(0), out.stride(1),
            BLOCK_T=TILE_T, BLOCK_R=block_r, BLOCK_K=block_k,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=4,
        )
        return out
    block_r = min(triton.next_power_of_2(rank), _SHRINK_BLOCK_R)
    _lora_shrink_kernel[(num_tokens, triton.cdiv(rank, block_r), splits)](
        x, a_slots, slot_of_token, out,
        k, rank, k_per_split, x.stride(0), a_slots.stride(0), a_slots.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4,
    )
    return out


def lora_expand(
    out: torch.Tensor, h: torch.Tensor, b_slots: torch.Tensor, slot_of_token: torch.Tensor,
    shard_starts: tuple[int, ...] = (0,), shared_ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of lora_expand_reference, in place: out [T, N] += h.sum(0) @ B[slot].T on
    the rows that have a slot; rows whose slot is -1 are not even rewritten. Returns out.

    out may be a column slice of a wider tensor (any row stride, contiguous last dim): the
    caller adds into slices of fused projection outputs. b_slots [S, N, R] shares out's dtype
    and has a contiguous last dim; h [splits, T, R] is float32 (lora_shrink's output) with a
    contiguous last dim. shard_starts: the first output column of each of a fused projection's
    shards (at most 3, the first 0); output columns of shard i read only ranks
    [i * R / shards, (i + 1) * R / shards) of B, the only ones that are not zero there, unless
    shared_ranks [S] int32 (required with several shards) is 1 for the row's slot: an adapter
    trained on the fused projection, whose ranks serve every shard.
    """
    if out.dim() != 2:
        raise ValueError(f"out must be [T, N], got {tuple(out.shape)}")
    if h.dim() != 3:
        raise ValueError(f"h must be [splits, T, R], got {tuple(h.shape)}")
    if b_slots.dim() != 3:
        raise ValueError(f"b_slots must be [S, N, R], got {tuple(b_slots.shape)}")
    num_tokens, n = out.shape
    splits, _, rank = h.shape
    if h.shape[1] != num_tokens:
        raise ValueError(
            f"h must be [splits, {num_tokens}, R] for out [{num_tokens}, {n}], got "
            f"{tuple(h.shape)}"
        )
    shards = len(shard_starts)
    if (not 1 <= shards <= 3 or shard_starts[0] != 0 or list(shard_starts) != sorted(shard_starts)
            or shard_starts[-1] >= max(n, 1) or rank % shards):
        raise ValueError(f"shard_starts must be 1 to 3 increasing columns < {n} from 0, the "
                         f"rank {rank} a multiple of their number, got {shard_starts}")
    if shards > 1 and (shared_ranks is None or shared_ranks.dtype != torch.int32
                       or shared_ranks.shape != b_slots.shape[:1]):
        raise ValueError(f"shared_ranks must be int32 [{b_slots.shape[0]}] with "
                         f"{shards} shards, got {shared_ranks}")
    if b_slots.shape[1:] != (n, rank):
        raise ValueError(
            f"b_slots must be [S, {n}, {rank}] for out [T, {n}] and h [T, {rank}], got "
            f"{tuple(b_slots.shape)}"
        )
    if out.dtype not in _DTYPES:
        raise ValueError(f"out.dtype must be one of {_DTYPES}, got {out.dtype}")
    if b_slots.dtype != out.dtype:
        raise ValueError(f"b_slots.dtype must be out's {out.dtype}, got {b_slots.dtype}")
    if h.dtype != torch.float32:
        raise ValueError(f"h.dtype must be float32, got {h.dtype}")
    if out.stride(1) != 1 and n > 1:
        raise ValueError(f"out's last dim must be contiguous, got strides {out.stride()}")
    if h.stride(2) != 1 and rank > 1:
        raise ValueError(f"h's last dim must be contiguous, got strides {h.stride()}")
    if b_slots.stride(2) != 1 and rank > 1:
        raise ValueError(f"b_slots's last dim must be contiguous, got strides {b_slots.stride()}")
    _check_slots(slot_of_token, num_tokens)
    _check_devices(out=out, h=h, b_slots=b_slots, slot_of_token=slot_of_token)
    if num_tokens == 0 or n == 0 or rank == 0:
        return out
    block_n = min(triton.next_power_of_2(n), 128)
    while any(start % block_n for start in shard_starts):  # a block never straddles shards
        block_n //= 2
    shard_rank = rank // shards
    block_r = min(triton.next_power_of_2(max(rank if shards == 1 else shard_rank, 16)), 64)
    start1, start2 = (list(shard_starts[1:]) + [n, n])[:2]
    shared = shared_ranks if shards > 1 else slot_of_token  # not read with one shard
    if num_tokens >= TILE_MIN_TOKENS and block_n >= 16:  # tl.dot's smallest tile
        tile_n = min(block_n, 64)
        _lora_expand_tiles_kernel[(triton.cdiv(num_tokens, TILE_T), triton.cdiv(n, tile_n))](
            out, h, b_slots, slot_of_token, shared,
            num_tokens, n, rank, splits, start1, start2, shard_rank, out.stride(0), h.stride(0),
            h.stride(1), b_slots.stride(0), b_slots.stride(1),
            BLOCK_T=TILE_T, BLOCK_N=tile_n, BLOCK_R=block_r, SHARDED=shards > 1, num_warps=4,
        )
        return out
    _lora_expand_kernel[(num_tokens, triton.cdiv(n, block_n))](
        out, h, b_slots, slot_of_token, shared,
        n, rank, splits, start1, start2, shard_rank, out.stride(0), h.stride(0), h.stride(1),
        b_slots.stride(0), b_slots.stride(1),
        BLOCK_N=block_n, BLOCK_R=block_r, SHARDED=shards > 1, num_warps=4,
    )
    return out

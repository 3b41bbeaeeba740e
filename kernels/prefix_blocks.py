"""Shared pieces of the prefix-sharing attention kernels: the in-register tile mask, the per-query bounds,
the block map's run lists, tile loads and stores, and launch configurations.

Nothing here imports ``pygpo``: ``kernels/`` sits below every other layer.

The mask of the prefix-sharing layout ("Accelerating Direct Preference Optimization with Prefix
Sharing", Wang & Hegde, 2024) is rebuilt per tile from three ``int32`` bounds per query,

    visible(q, k) = (lo1[q] <= k < hi1[q])  OR  (lo2[q] <= k <= q)          (and q < S, k < S)

so no ``S x S`` mask is ever read from memory (FlashAttention-2, Dao 2023, builds its causal mask the
same way, from indices). Which tiles are visited at all, and which need this mask, is decided on the
host from the same bounds (``pygpo.prefix.blocks``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl  # noqa: F401  (the interpreter needs it in the globals of jitted code)

from .utils import INTERPRET

@triton.jit
def tile_visible(rows, cols, lo1, hi1, lo2, S):
    """Bool tile: whether query ``rows`` sees key ``cols``. All arguments broadcast against each other
    (``rows``, ``lo1``, ``hi1``, ``lo2`` along one axis, ``cols`` along the other)."""
    in_prefix = (cols >= lo1) & (cols < hi1)
    in_own = (cols >= lo2) & (cols <= rows)
    return (in_prefix | in_own) & (rows < S) & (cols < S)


@triton.jit
def load_bounds(bounds, rows, row_ok, S):
    """``(lo1, hi1, lo2)`` of queries ``rows`` from one batch row's ``(3, S)`` int32 bounds (0 where not ``row_ok``)."""
    lo1 = tl.load(bounds + rows, mask=row_ok, other=0)
    hi1 = tl.load(bounds + S + rows, mask=row_ok, other=0)
    lo2 = tl.load(bounds + 2 * S + rows, mask=row_ok, other=0)
    return lo1, hi1, lo2


@triton.jit
def block_runs(FULL_CNT, FULL_RUNS, PART_CNT, PART_RUNS, list_row, N_OTHER):
    """``(n_full, full_runs, n_part, part_runs)`` of one block's row ``list_row`` of a block map's run lists.

    ``FULL_CNT``/``PART_CNT`` hold one int32 run count per list row; ``FULL_RUNS``/``PART_RUNS`` hold
    ``N_OTHER`` int32 pairs ``[start, stop)`` per list row (``N_OTHER`` = number of blocks on the other
    axis). Run ``r`` spans blocks ``full_runs[2 r]`` to ``full_runs[2 r + 1]``; callers walk them as
    plain ranges (affine loads, which the compiler software-pipelines).
    """
    row = list_row.to(tl.int64) * (2 * N_OTHER)
    return tl.load(FULL_CNT + list_row), FULL_RUNS + row, tl.load(PART_CNT + list_row), PART_RUNS + row


@triton.jit
def load_tile_pair(a_base, b_base, idx, stride_as, stride_ad, stride_bs, stride_bd, S, D,
                   MASKED: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``idx`` of two ``(S, D)`` operands that are always read together (k and v, or q and dO), as
    ``(len(idx), BLOCK_D)`` tiles. ``MASKED`` guards ragged sequence ends; otherwise only a head dim that
    is not a power of two needs a mask. ``UPCAST`` gives fp32 copies (the interpreter's bf16 dots)."""
    offs_d = tl.arange(0, BLOCK_D)
    a_ptrs = a_base + idx[:, None].to(tl.int64) * stride_as + offs_d[None, :] * stride_ad
    b_ptrs = b_base + idx[:, None].to(tl.int64) * stride_bs + offs_d[None, :] * stride_bd
    if MASKED:
        ld_mask = (idx[:, None] < S) & (offs_d[None, :] < D)
        a = tl.load(a_ptrs, mask=ld_mask, other=0.0)
        b = tl.load(b_ptrs, mask=ld_mask, other=0.0)
    elif EVEN_D:
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
    else:
        a = tl.load(a_ptrs, mask=offs_d[None, :] < D, other=0.0)
        b = tl.load(b_ptrs, mask=offs_d[None, :] < D, other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return a, b


@triton.jit
def store_tile(base, idx, stride_s, stride_d, x, S, D, BLOCK_D: tl.constexpr):
    """Store the fp32 ``(len(idx), BLOCK_D)`` tile ``x`` into rows ``idx`` of an ``(S, D)`` operand at
    ``base``, in that operand's dtype, leaving padded rows and columns alone."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + idx[:, None].to(tl.int64) * stride_s + offs_d[None, :] * stride_d
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=(idx[:, None] < S) & (offs_d[None, :] < D))


@dataclass(frozen=True)
class PrefixAttentionConfig:
    """Tile sizes and launch parameters of the three kernels.

    ``fwd_m x fwd_n``: forward tiles (query block x key block); ``dq_m x dq_n``: the ``dQ`` kernel;
    ``kv_m x kv_n``: the ``dK/dV`` kernel. Each pair needs its own block map. All sizes are powers of
    two and at least 16 (``tl.dot``). ``*_warps`` / ``*_stages``: ``num_warps`` / ``num_stages`` of
    each kernel. ``atomic_dq``: ``dQ`` accumulated by the ``dK/dV`` kernel with atomic adds (five tile
    products per tile instead of seven, not bitwise reproducible; the ``dq_*`` fields then go unused).
    """

    fwd_m: int
    fwd_n: int
    dq_m: int
    dq_n: int
    kv_m: int
    kv_n: int
    fwd_warps: int = 4
    fwd_stages: int = 1
    dq_warps: int = 4
    dq_stages: int = 1
    kv_warps: int = 4
    kv_stages: int = 1
    atomic_dq: bool = False

    def __post_init__(self) -> None:
        # a tile of another size fails deep inside triton (tl.arange, tl.dot), or divides by zero
        for name in ("fwd_m", "fwd_n", "dq_m", "dq_n", "kv_m", "kv_n"):
            size = getattr(self, name)
            if isinstance(size, bool) or not isinstance(size, int) or size < 16 or size & (size - 1):
                raise ValueError(f"PrefixAttentionConfig.{name} must be a power of two of at least 16, got {size!r}")


def default_config(head_dim: int, dtype: torch.dtype) -> PrefixAttentionConfig:
    """Tiles for ``head_dim`` and ``dtype``.

    In the interpreter: 16 x 16 everywhere (several tiles even at tiny S, fast to interpret). On a GPU:
    FlashAttention-2-like tiles, chosen (without a GPU at hand) as the candidates with the fewest
    register spills in ``ptxas -v`` for sm_90a: 16-bit inputs spill nothing or under 200 bytes per
    thread; fp32 inputs (``ieee`` dots on CUDA cores) are correct but not tuned. Not autotuned: the
    block maps depend on the tile sizes (a map is cheap and cached per layout, but one per candidate
    is not).
    """
    if INTERPRET:
        return PrefixAttentionConfig(16, 16, 16, 16, 16, 16)
    if dtype == torch.float32:
        # dK/dV tiles of 32 x 32: with 32 x 64 the kernel needs 205 KiB of shared memory at head dim 256
        # (over the A100's 163 KiB) and 105 KiB at 128 (over the 99 KiB of sm_86/sm_89); 32 x 32 takes
        # 133 KiB and 69 KiB (ptxas, sm_80).
        return PrefixAttentionConfig(32, 32, 32, 32, 32, 32, fwd_warps=4, fwd_stages=1, dq_warps=4, dq_stages=1,
                                     kv_warps=8, kv_stages=2)
    if block_d(head_dim) <= 64:
        return PrefixAttentionConfig(128, 64, 64, 64, 64, 128, fwd_warps=8, fwd_stages=3, dq_warps=4, dq_stages=2,
                                     kv_warps=8, kv_stages=2)
    return PrefixAttentionConfig(128, 64, 128, 32, 64, 64, fwd_warps=8, fwd_stages=3, dq_warps=8, dq_stages=3,
                                 kv_warps=8, kv_stages=3)


def block_d(head_dim: int) -> int:
    """Padded head dimension: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(head_dim))

"""Backward of block-sparse prefix-sharing attention: ``dQ``, ``dK``, ``dV`` without atomics.

With ``P = softmax(scale Q K^T + M)`` recomputed tile by tile from the forward's base-2 log-sum-exp
(``P = 2^(s - LSE2)``, ``s = scale log2(e) q k^T``) and ``Delta_q = sum_d dO[q, d] O[q, d]``:

    dV = P^T dO,    dP = dO V^T,    dS = P * (dP - Delta),    dQ = scale dS K,    dK = scale dS^T Q

as in FlashAttention-2 (Dao, 2023). By default two kernels, each owning its output so nothing is
accumulated with atomics (deterministic):

* ``dK/dV``: a program per (key block, batch row, key/value head) walks the *query* blocks that see its
  key block (the transposed block map), for every query head of its group (grouped-query attention
  sums the group's contributions in registers);
* ``dQ``: a program per (query block, batch row, query head) walks the key blocks of the forward map.

With ``atomic_dq`` the ``dK/dV`` kernel also adds each tile's ``scale dS K`` into a float32 ``dQ`` with
atomic adds, as FlashAttention-2's backward does: five tile products per visited tile instead of the
seven of the two kernels (no second ``Q K^T`` and ``dO V^T``), at the price of atomics and of a
summation order that varies from run to run.

In both, tiles are walked as runs of consecutive blocks (affine loads, which the compiler
software-pipelines); full tiles run without a mask and partial tiles rebuild the prefix-sharing mask ("Accelerating
Direct Preference Optimization with Prefix Sharing", Wang & Hegde, 2024) from the per-query bounds.
``Delta`` is computed by the caller (one fused torch reduction). Attention sinks (see the forward) need
no change here: the forward's ``LSE2`` includes them.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .prefix_blocks import block_d, block_runs, load_bounds, load_tile_pair, store_tile, tile_visible
from .utils import dot_precision, upcast_dots


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, qb, q_base, do_base, lse_base, delta_base, dq_base, bounds, cols,
    stride_qs, stride_qd, stride_dos, stride_dod, stride_dqs, stride_dqd, S, D, qk_scale, scale,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Add query block ``qb``'s contribution to ``dk, dv`` ``(BLOCK_N, BLOCK_D)`` of key block ``cols``
    (and, with ``ATOMIC_DQ``, the key block's contribution to the float32 ``dQ`` rows of ``qb``)."""
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    q, do = load_tile_pair(q_base, do_base, rows, stride_qs, stride_qd, stride_dos, stride_dod, S, D,
                           MASKED, EVEN_D, UPCAST, BLOCK_D)
    if MASKED:
        row_ok = rows < S
        lse2 = tl.load(lse_base + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    else:
        lse2 = tl.load(lse_base + rows)
        delta = tl.load(delta_base + rows)
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
    p_t = tl.exp2(s_t - lse2[None, :])
    if MASKED:
        lo1, hi1, lo2 = load_bounds(bounds, rows, rows < S, S)
        vis = tile_visible(rows[None, :], cols[:, None], lo1[None, :], hi1[None, :], lo2[None, :], S)
        p_t = tl.where(vis, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    if ATOMIC_DQ:
        dq = tl.dot(tl.trans(ds_t).to(k.dtype), k, input_precision=PRECISION) * scale  # (BLOCK_M, BLOCK_D)
        offs_d = tl.arange(0, BLOCK_D)
        dq_ptrs = dq_base + rows[:, None].to(tl.int64) * stride_dqs + offs_d[None, :] * stride_dqd
        tl.atomic_add(dq_ptrs, dq, mask=(rows[:, None] < S) & (offs_d[None, :] < D), sem="relaxed")
    return dk, dv


@triton.jit
def prefix_attention_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV, DQ_ACC, BOUNDS,
    FULL_CNT, FULL_RUNS, PART_CNT, PART_RUNS,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    S, D, HQ, HKV, GROUP, NKB, NQB, qk_scale, scale,
    EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program ``(j, b * HKV + g)``: ``dK, dV`` of keys ``[j * BLOCK_N, +BLOCK_N)``, row ``b``, kv head ``g``.

    FULL_CNT/PART_CNT ``(B, NKB)`` int32 run counts, FULL_RUNS/PART_RUNS ``(B, NKB, NQB, 2)`` int32 runs
    ``[start, stop)`` of full / partial query blocks (``BlockMap.key_major``). DQ_ACC ``(B, HQ, S, D)``
    float32, zeroed, the ``dQ`` accumulator (read only when ``ATOMIC_DQ``).
    """
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // HKV
    g = pid_bg % HKV
    b64 = b.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_base = K + b64 * stride_kb + g.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + g.to(tl.int64) * stride_vh
    # masked: the last key block may run past S
    k, v = load_tile_pair(k_base, v_base, cols, stride_ks, stride_kd, stride_vs, stride_vd, S, D,
                          True, EVEN_D, UPCAST, BLOCK_D)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    bounds = BOUNDS + b64 * 3 * S

    n_full, full_runs, n_part, part_runs = block_runs(FULL_CNT, FULL_RUNS, PART_CNT, PART_RUNS, b * NKB + pid_n, NQB)
    for hh in range(0, GROUP):
        h = (g * GROUP + hh).to(tl.int64)
        q_base = Q + b64 * stride_qb + h * stride_qh
        do_base = DO + b64 * stride_dob + h * stride_doh
        lse_base = LSE2 + (b64 * HQ + h) * S
        delta_base = DELTA + (b64 * HQ + h) * S
        dq_base = DQ_ACC + b64 * stride_dqb + h * stride_dqh
        # runs of consecutive query blocks: affine loads, which the compiler software-pipelines
        for r in range(0, n_full):
            for qb in range(tl.load(full_runs + 2 * r), tl.load(full_runs + 2 * r + 1)):
                dk, dv = _dkdv_tile(dk, dv, k, v, qb, q_base, do_base, lse_base, delta_base, dq_base, bounds,
                                    cols, stride_qs, stride_qd, stride_dos, stride_dod, stride_dqs, stride_dqd,
                                    S, D, qk_scale, scale, False, EVEN_D, UPCAST, PRECISION, ATOMIC_DQ,
                                    BLOCK_M, BLOCK_D)
        for r in range(0, n_part):
            for qb in range(tl.load(part_runs + 2 * r), tl.load(part_runs + 2 * r + 1)):
                dk, dv = _dkdv_tile(dk, dv, k, v, qb, q_base, do_base, lse_base, delta_base, dq_base, bounds,
                                    cols, stride_qs, stride_qd, stride_dos, stride_dod, stride_dqs, stride_dqd,
                                    S, D, qk_scale, scale, True, EVEN_D, UPCAST, PRECISION, ATOMIC_DQ,
                                    BLOCK_M, BLOCK_D)

    dk = dk * scale
    store_tile(DK + b64 * stride_dkb + g.to(tl.int64) * stride_dkh, cols, stride_dks, stride_dkd, dk, S, D, BLOCK_D)
    store_tile(DV + b64 * stride_dvb + g.to(tl.int64) * stride_dvh, cols, stride_dvs, stride_dvd, dv, S, D, BLOCK_D)


@triton.jit
def _dq_tile(
    dq, q, do, lse2, delta, k_base, v_base, kb, rows, lo1, hi1, lo2,
    stride_ks, stride_kd, stride_vs, stride_vd, S, D, qk_scale,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Add key block ``kb``'s contribution to ``dq`` ``(BLOCK_M, BLOCK_D)`` (unscaled)."""
    cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    k, v = load_tile_pair(k_base, v_base, cols, stride_ks, stride_kd, stride_vs, stride_vd, S, D,
                          MASKED, EVEN_D, UPCAST, BLOCK_D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        vis = tile_visible(rows[:, None], cols[None, :], lo1[:, None], hi1[:, None], lo2[:, None], S)
        p = tl.where(vis, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def prefix_attention_dq_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ, BOUNDS,
    FULL_CNT, FULL_RUNS, PART_CNT, PART_RUNS,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    S, D, HQ, GROUP, NQB, NKB, qk_scale, scale,
    EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program ``(NQB - 1 - i, b * HQ + h)``: ``dQ`` of queries ``[i * BLOCK_M, +BLOCK_M)``, row ``b``, head ``h``."""
    pid_m = NQB - 1 - tl.program_id(0)  # heaviest query blocks first, as in the forward
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    g = h // GROUP
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < S
    # masked: the last query block may run past S
    q, do = load_tile_pair(Q + b64 * stride_qb + h64 * stride_qh, DO + b64 * stride_dob + h64 * stride_doh,
                           rows, stride_qs, stride_qd, stride_dos, stride_dod, S, D, True, EVEN_D, UPCAST, BLOCK_D)
    lse2 = tl.load(LSE2 + pid_bh.to(tl.int64) * S + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * S + rows, mask=row_ok, other=0.0)
    lo1, hi1, lo2 = load_bounds(BOUNDS + b64 * 3 * S, rows, row_ok, S)
    k_base = K + b64 * stride_kb + g.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + g.to(tl.int64) * stride_vh
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    n_full, full_runs, n_part, part_runs = block_runs(FULL_CNT, FULL_RUNS, PART_CNT, PART_RUNS, b * NQB + pid_m, NKB)
    for r in range(0, n_full):
        for kb in range(tl.load(full_runs + 2 * r), tl.load(full_runs + 2 * r + 1)):
            dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, kb, rows, lo1, hi1, lo2,
                          stride_ks, stride_kd, stride_vs, stride_vd, S, D, qk_scale,
                          False, EVEN_D, UPCAST, PRECISION, BLOCK_N, BLOCK_D)
    for r in range(0, n_part):
        for kb in range(tl.load(part_runs + 2 * r), tl.load(part_runs + 2 * r + 1)):
            dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, kb, rows, lo1, hi1, lo2,
                          stride_ks, stride_kd, stride_vs, stride_vd, S, D, qk_scale,
                          True, EVEN_D, UPCAST, PRECISION, BLOCK_N, BLOCK_D)
    dq = dq * scale
    store_tile(DQ + b64 * stride_dqb + h64 * stride_dqh, rows, stride_dqs, stride_dqd, dq, S, D, BLOCK_D)


def attention_delta(o: Tensor, do: Tensor) -> Tensor:
    """``Delta = sum_d dO * O``: ``(B, Hq, S)`` float32, contiguous (one fused torch reduction)."""
    return (do.float() * o.float()).sum(-1).contiguous()


def launch_dkdv(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse2: Tensor, delta: Tensor, bounds: Tensor,
    k_lists: tuple[Tensor, Tensor, Tensor, Tensor], kv_tiles: tuple[int, int], scale: float,
    kv_launch: tuple[int, int] = (4, 1), atomic_dq: bool = False,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The ``dK/dV`` kernel alone (arguments as in :func:`prefix_attention_bwd`); ``dk, dv`` and, with
    ``atomic_dq``, ``dq`` in ``q.dtype`` (else ``None``)."""
    B, HQ, S, D = q.shape
    HKV = k.shape[1]
    bd = block_d(D)
    dk = torch.empty((B, S, HKV, D), dtype=k.dtype, device=k.device).transpose(1, 2)
    dv = torch.empty((B, S, HKV, D), dtype=v.dtype, device=v.device).transpose(1, 2)
    # float32 accumulator in the (B, S, Hq, d) memory layout that dQ is returned in
    dq_acc = torch.zeros((B, S, HQ, D) if atomic_dq else (1, 1, 1, 1), dtype=torch.float32,
                         device=q.device).transpose(1, 2)
    kf_count, kf_runs, kp_count, kp_runs = k_lists
    n_k, n_q = kp_runs.shape[1], kp_runs.shape[2]
    prefix_attention_dkdv_kernel[(n_k, B * HKV)](
        q, k, v, do, lse2, delta, dk, dv, dq_acc, bounds,
        kf_count, kf_runs, kp_count, kp_runs,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *dq_acc.stride(),
        S, D, HQ, HKV, HQ // HKV, n_k, n_q, scale * 1.4426950408889634, scale,
        EVEN_D=bd == D, UPCAST=upcast_dots(q.dtype), PRECISION=dot_precision(q.dtype), ATOMIC_DQ=atomic_dq,
        BLOCK_M=kv_tiles[0], BLOCK_N=kv_tiles[1], BLOCK_D=bd,
        num_warps=kv_launch[0], num_stages=kv_launch[1],
    )
    return dk, dv, dq_acc.to(q.dtype) if atomic_dq else None


def launch_dq(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse2: Tensor, delta: Tensor, bounds: Tensor,
    q_lists: tuple[Tensor, Tensor, Tensor, Tensor], dq_tiles: tuple[int, int], scale: float,
    dq_launch: tuple[int, int] = (4, 1),
) -> Tensor:
    """The ``dQ`` kernel alone (arguments as in :func:`prefix_attention_bwd`); ``dq``."""
    B, HQ, S, D = q.shape
    bd = block_d(D)
    dq = torch.empty((B, S, HQ, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    qf_count, qf_runs, qp_count, qp_runs = q_lists
    n_q, n_k = qp_runs.shape[1], qp_runs.shape[2]
    prefix_attention_dq_kernel[(n_q, B * HQ)](
        q, k, v, do, lse2, delta, dq, bounds,
        qf_count, qf_runs, qp_count, qp_runs,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        S, D, HQ, HQ // k.shape[1], n_q, n_k, scale * 1.4426950408889634, scale,
        EVEN_D=bd == D, UPCAST=upcast_dots(q.dtype), PRECISION=dot_precision(q.dtype),
        BLOCK_M=dq_tiles[0], BLOCK_N=dq_tiles[1], BLOCK_D=bd,
        num_warps=dq_launch[0], num_stages=dq_launch[1],
    )
    return dq


def prefix_attention_bwd(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse2: Tensor, do: Tensor, bounds: Tensor,
    q_lists: tuple[Tensor, Tensor, Tensor, Tensor], dq_tiles: tuple[int, int],
    k_lists: tuple[Tensor, Tensor, Tensor, Tensor], kv_tiles: tuple[int, int],
    scale: float, dq_launch: tuple[int, int] = (4, 1), kv_launch: tuple[int, int] = (4, 1),
    delta: Optional[Tensor] = None, atomic_dq: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the ``dK/dV`` and ``dQ`` kernels.

    Args:
        q, k, v, o, do: as in the forward (``do`` the gradient of ``o``); any strides.
        lse2: ``(B, Hq, S)`` float32 from the forward.
        bounds: ``(B, 3, S)`` int32.
        q_lists: ``BlockMap.query_major()`` of the ``dq_tiles = (block_m, block_n)`` map (run counts and
            runs of full and partial tiles). k_lists: ``BlockMap.key_major()`` of the ``kv_tiles`` map.
        scale: softmax scale.
        dq_launch, kv_launch: ``(num_warps, num_stages)`` of the ``dQ`` and ``dK/dV`` kernels.
        delta: :func:`attention_delta` of ``o, do`` when the caller has it already (sinks need it too).
        atomic_dq: ``dQ`` from the ``dK/dV`` kernel with atomic adds (``q_lists``/``dq_tiles`` unused).

    Returns:
        ``dq`` ``(B, Hq, S, d)``, ``dk, dv`` ``(B, Hkv, S, d)`` in the inputs' dtypes.
    """
    delta = attention_delta(o, do) if delta is None else delta
    lse2 = lse2.contiguous()
    dk, dv, dq = launch_dkdv(q, k, v, do, lse2, delta, bounds, k_lists, kv_tiles, scale, kv_launch, atomic_dq)
    if dq is None:
        dq = launch_dq(q, k, v, do, lse2, delta, bounds, q_lists, dq_tiles, scale, dq_launch)
    return dq, dk, dv

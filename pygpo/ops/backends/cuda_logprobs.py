"""cuda backend: cuBLAS logit tiles plus the compiled epilogue kernels of ``pygpo._C``.

Same contract and math as ``torch_chunked`` (see ``pygpo.ops.token_stats``): the logits ``H @ W.T``
are produced one ``rows x vocab`` tile at a time by ``torch.mm`` in the input dtype (cuBLAS, fp32
accumulation), and instead of torch's elementwise code one kernel launch per tile folds the tile into
the rows' online statistics in fp32 (``csrc/logits_epilogue.cu``). The backward recomputes each tile,
one launch overwrites it with ``dRaw`` in place (softmax, one-hot, entropy, ``log sum p^2`` and mean
terms, softcap and temperature included), and ``dH``, ``dW`` accumulate in fp32 through matmuls on
``dRaw`` in the input dtype. Where a 16-bit bias needs its gradient, the tile is widened to fp32 first,
so ``db`` sums unrounded ``dRaw`` as the torch backend's does.

A tile holds one element of the tile dtype per logit (no fp32 copies), so a memory budget admits
``TILE_BYTES_PER_ELEMENT / itemsize`` times the elements the torch backend's tiles take (fewer where a
16-bit bias needs its gradient: the backward then widens each tile to fp32). When the whole valid-row
logit matrix fits the budget, it is kept for the backward instead (three matmuls instead of four; see
``CudaTokenStats``).

Under ``torch.autocast`` the tiles take autocast's dtype (as the model's own ``lm_head`` would), chosen
once in the forward: the backward recomputes them in that same dtype whatever autocast says then (a
backward usually runs outside the autocast region), so the recomputed logits equal those that gave the
log-sum-exp, and a kept matrix equals its recomputation bit for bit.

CPU tensors run the kernels' host twins (the same arithmetic compiled for the CPU); that path exists
for tests, the dispatcher sends this backend CUDA tensors only.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _cuda
from ..autocast import autocast_disabled
from ..chunking import DEFAULT_MEMORY_BUDGET, TILE_BYTES_PER_ELEMENT, Chunks, choose_chunks, kept_logits_rows
from ..first_order import first_order_only
from ..matmul_accumulate import add_matmul_
from ..token_stats import StatRequest, TokenStats
from .torch_tiles import backward_possible, cast_grads, grad_accumulators, matmul_dtype

#: Input dtypes the kernels read.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Threads per row the host twins emulate (the kernels use 256); a few lanes exercise the merges.
HOST_LANES = 4


def cuda_chunks(num_rows: int, vocab_size: int, itemsize: int, memory_budget: Optional[int]) -> Chunks:
    """Tile shape for tiles costing ``itemsize`` bytes an element within ``memory_budget`` bytes."""
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    return choose_chunks(num_rows, vocab_size, memory_budget=max(budget * TILE_BYTES_PER_ELEMENT // itemsize, 1))


def tile_dtype(hidden: Tensor) -> torch.dtype:
    """Dtype of the logit tiles: autocast's where autocast is on for ``hidden``'s device, else the input's
    on GPUs (cuBLAS, fp32 accumulation) and fp32 on the CPU (as the torch backend: CPU half matmuls are slow)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return matmul_dtype(hidden)


def _float32_positive(name: str, value: float) -> float:
    """``value`` as the kernels see it (float32), refused when it is not a positive finite float32."""
    f = float(torch.tensor(value, dtype=torch.float32))
    if not 0.0 < f < float("inf"):
        raise ValueError(f"{name} must be a positive number representable in float32 for backend='cuda', got {value!r}")
    return f


def epilogue_args(tile: Tensor, bias: Optional[Tensor], labels: Tensor, v0: int, vocab: int, req: StatRequest):
    """The kernels' ``EpilogueArgs`` for a tile of vocabulary entries ``[v0, v0 + cols)`` of ``vocab``.

    ``tile``: ``(rows, cols)`` with unit column stride (any row stride); ``bias``: ``(cols,)`` of the tile's
    dtype or ``None``; ``labels``: ``(rows,)`` contiguous int64.
    """
    if tile.dim() != 2 or (tile.shape[1] > 1 and tile.stride(1) != 1) or tile.stride(0) < tile.shape[1]:
        raise ValueError(f"tile must be (rows, cols) with unit column stride, got shape {tuple(tile.shape)} "
                         f"strides {tile.stride()}")
    if labels.dtype != torch.int64 or not labels.is_contiguous() or labels.shape != tile.shape[:1]:
        raise ValueError(f"labels must be a contiguous ({tile.shape[0]},) int64 tensor, got "
                         f"{tuple(labels.shape)} {labels.dtype}")
    softcap = 0.0 if req.softcap is None else _float32_positive("softcap", req.softcap)
    return _cuda.make(
        "EpilogueArgs", tile=tile.data_ptr(), dtype=_cuda.DTYPE_CODES[tile.dtype], rows=tile.shape[0],
        cols=tile.shape[1], ld=tile.stride(0), bias=_cuda.ptr(bias), labels=labels.data_ptr(), v0=v0, vocab=vocab,
        inv_temperature=_float32_positive("1 / temperature", 1.0 / req.temperature), softcap=softcap,
    )


def launch(kind: str, tile: Tensor, args, extra) -> None:
    """Launch kernel ``kind`` (``epilogue_fwd`` / ``epilogue_bwd``) on the tile's device, or its host twin."""
    if tile.is_cuda:
        _cuda.launch(kind, tile, args, extra)
    else:
        getattr(_cuda.require(), "host_" + kind)(args, extra, HOST_LANES)


def mm_tile(h: Tensor, weight: Tensor, cols: slice, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Raw logits ``h @ W[cols].T``, contiguous (the kernels' layout), in ``dtype`` (default: the input's on
    GPUs, fp32 on the CPU; see :func:`tile_dtype`)."""
    mm = matmul_dtype(h) if dtype is None else dtype
    return torch.mm(h.to(mm), weight[cols].to(mm).t())


def tile_bias(bias: Optional[Tensor], cols: slice, tile: Tensor) -> Optional[Tensor]:
    """The bias of the tile's columns in the tile's dtype, contiguous (the kernels read both as one dtype,
    the bias with unit stride)."""
    return None if bias is None else bias[cols].to(tile.dtype).contiguous()


def backprop_raw_tile(d_raw: Tensor, h: Tensor, weight: Tensor, cols: slice, d_h: Optional[Tensor],
                      d_w: Optional[Tensor], d_b: Optional[Tensor], dtype: Optional[torch.dtype] = None) -> None:
    """Accumulate a tile's gradients from its ``dRaw`` (rows ``h`` x vocabulary entries ``cols``):
    ``db[cols] += sum_rows dRaw``, ``d_h += dRaw @ W[cols]``, ``dW[cols] += dRaw^T @ h`` (any may be ``None``),
    the matmuls in ``dtype`` (default as :func:`mm_tile`)."""
    if d_b is not None:
        d_b[cols] += d_raw.sum(0)
    mm = matmul_dtype(h) if dtype is None else dtype
    d_c = d_raw.to(mm)
    if d_h is not None:
        add_matmul_(d_h, d_c, weight[cols].to(mm))
    if d_w is not None:
        add_matmul_(d_w[cols], d_c.t(), h.to(mm))


def _grad_args(rows: slice, lse: Tensor, upstream: list, entropy: Optional[Tensor], log_sum_p2: Optional[Tensor]):
    """The kernels' ``GradArgs`` (per-row statistics and upstream gradients) of rows ``rows``."""
    g_lp, g_lse, g_ent, g_l2, g_mz = upstream
    fields = {"lse": lse, "g_logprobs": g_lp, "g_lse": g_lse, "g_entropy": g_ent, "entropy": entropy,
              "g_log_sum_p2": g_l2, "log_sum_p2": log_sum_p2, "g_mean_logit": g_mz}
    return _cuda.make("GradArgs", **{k: _cuda.ptr(None if t is None else t[rows]) for k, t in fields.items()})


def _fill_kept(hidden: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """All raw logits ``H @ W.T`` in ``dtype``, one matmul (cuBLAS on GPUs), ``(M, V)`` contiguous."""
    return mm_tile(hidden, weight, slice(None), dtype)


def tile_cost(itemsize: int, bias: Optional[Tensor], differentiable: bool) -> int:
    """Bytes a recomputed tile takes an element at its peak: the tile, plus, where a 16-bit bias needs its
    gradient, the backward's fp32 copy (its sum is the bias gradient) beside it."""
    widened = differentiable and bias is not None and bias.requires_grad and itemsize < 4
    return itemsize + 4 if widened else itemsize


class CudaTokenStats(torch.autograd.Function):
    """Autograd function over the valid rows: ``(M, D), (V, D), (V,)?, (M,) -> TokenStats`` fields.

    Like the torch backend, two strategies by memory budget (``pygpo.ops.chunking``): when the whole
    ``M x V`` raw logit matrix (tile dtype) fits, one matmul writes it, one launch folds it, and it is
    kept; the backward overwrites it with ``dRaw`` (a launch per chunk of rows) and runs two matmuls on
    it. Otherwise tiles are recomputed in the backward. The kept matrix holds the very tile values the
    recomputation would give, so both strategies compute the same numbers.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, req: StatRequest, memory_budget, differentiable: bool):
        ctx.set_materialize_grads(False)
        dtype = ctx.tile_dtype = tile_dtype(hidden)
        with autocast_disabled():  # the tiles' dtype is chosen explicitly
            return CudaTokenStats._forward(ctx, hidden, weight, bias, labels, req, memory_budget, differentiable, dtype)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, labels, req, memory_budget, differentiable, dtype):
        n, vocab = hidden.shape[0], weight.shape[0]
        tile_bytes = torch.finfo(dtype).bits // 8
        chunks = cuda_chunks(n, vocab, tile_cost(tile_bytes, bias, differentiable), memory_budget)
        ctx.kept_rows = kept_logits_rows(n, vocab, tile_bytes, memory_budget=memory_budget) if differentiable else None
        ctx.kept = None
        f32 = dict(device=hidden.device, dtype=torch.float32)
        wanted = (True, True, req.entropy, req.log_sum_p2, req.mean_logit, req.top1)
        outs = [torch.empty(n, **f32) if w else None for w in wanted]
        if ctx.kept_rows is not None:
            chunks = Chunks(rows=max(n, 1), vocab=vocab)  # one whole-vocabulary tile of every row
        state = torch.empty(chunks.rows, _cuda.require().STATE_FIELDS, **f32) if chunks.vocab < vocab else None
        for rows, v0, cols in chunks.tiles(n, vocab):
            if ctx.kept_rows is not None:
                tile = ctx.kept = _fill_kept(hidden, weight, dtype)
            else:
                tile = mm_tile(hidden[rows], weight, cols, dtype)
            fold = dict(zip(TokenStats._fields, (_cuda.ptr(None if o is None else o[rows]) for o in outs)))
            b_cols = tile_bias(bias, cols, tile)  # held until the launch: the kernel gets its address only
            args = epilogue_args(tile, b_cols, labels[rows], v0, vocab, req)
            launch("epilogue_fwd", tile, args, _cuda.make(
                "FoldArgs", state=_cuda.ptr(state), first=int(v0 == 0), last=int(v0 + chunks.vocab >= vocab), **fold))
        result = TokenStats(*outs)
        if result.is_top1 is not None:
            ctx.mark_non_differentiable(result.is_top1)
        ctx.save_for_backward(hidden, weight, bias, labels, result.lse, result.entropy, result.log_sum_p2)
        ctx.req, ctx.chunks = req, chunks
        return tuple(result)

    @staticmethod
    @first_order_only
    def backward(ctx, g_lp, g_lse, g_ent, g_l2, g_mz, _g_top1=None):
        if all(g is None for g in (g_lp, g_lse, g_ent, g_l2, g_mz)):
            return (None,) * 7
        with autocast_disabled():
            return CudaTokenStats._backward(ctx, g_lp, g_lse, g_ent, g_l2, g_mz)

    @staticmethod
    def _backward(ctx, g_lp, g_lse, g_ent, g_l2, g_mz):
        hidden, weight, bias, labels, lse, entropy, log_sum_p2 = ctx.saved_tensors
        req, chunks, dtype = ctx.req, ctx.chunks, ctx.tile_dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, vocab = hidden.shape[0], weight.shape[0]
        d_h, d_w, d_b = grad_accumulators(hidden, weight, bias, need_h, need_w, need_b)
        # the bias as the forward's kernels read it (rounded to the tile dtype), whatever dtype dRaw takes
        tile_b = None if bias is None else bias.to(dtype)
        upstream = [None if g is None else g.float().contiguous() for g in (g_lp, g_lse, g_ent, g_l2, g_mz)]
        if ctx.kept_rows is not None:
            # consumed in place; a second backward (retain_graph) recomputes the same matmul
            kept, ctx.kept = ctx.kept, None
            kept = _fill_kept(hidden, weight, dtype) if kept is None else kept
            everything = slice(0, vocab)
            for r0 in range(0, n, ctx.kept_rows):
                rows = slice(r0, r0 + ctx.kept_rows)
                # the bias sums dRaw before it is rounded to the matmul dtype
                d_raw = kept[rows].to(d_b.dtype) if d_b is not None else kept[rows]
                b_cols = tile_bias(tile_b, everything, d_raw)
                launch("epilogue_bwd", d_raw, epilogue_args(d_raw, b_cols, labels[rows], 0, vocab, req),
                       _grad_args(rows, lse, upstream, entropy, log_sum_p2))
                if d_b is not None:
                    d_b += d_raw.sum(0)
                    kept[rows].copy_(d_raw)
            backprop_raw_tile(kept, hidden, weight, everything, d_h, d_w, None, dtype)
        else:
            for rows, v0, cols in chunks.tiles(n, vocab):
                d_raw = mm_tile(hidden[rows], weight, cols, dtype)
                if d_b is not None:
                    d_raw = d_raw.to(d_b.dtype)  # the bias sums dRaw before it is rounded to the matmul dtype
                b_cols = tile_bias(tile_b, cols, d_raw)
                launch("epilogue_bwd", d_raw, epilogue_args(d_raw, b_cols, labels[rows], v0, vocab, req),
                       _grad_args(rows, lse, upstream, entropy, log_sum_p2))
                backprop_raw_tile(d_raw, hidden[rows], weight, cols, None if d_h is None else d_h[rows], d_w, d_b,
                                  dtype)
        return cast_grads((d_h, d_w, d_b), hidden, weight, bias) + (None, None, None, None)


def compute_token_stats(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    req: StatRequest,
    *,
    memory_budget: Optional[int] = None,
    deterministic: bool = False,
) -> TokenStats:
    """Backend entry point (same contract as ``torch_chunked.compute_token_stats``).

    Args:
        hidden: ``(M, D)`` valid rows only, float32/float16/bfloat16, contiguous, on CUDA.
        weight: ``(V, D)``, same dtype and device. bias: ``(V,)`` or ``None``.
        labels: ``(M,)`` int64 in ``[0, V)``.
        req: which optional statistics, temperature and softcap.
        memory_budget: bytes one logit tile may take (``M_chunk x V_chunk`` elements of the input dtype),
            or, when the whole ``M x V`` matrix fits, the bytes of that matrix kept for the backward.
        deterministic: accepted for the common contract; this backend has no atomics, so it is always
            deterministic.

    Returns:
        ``TokenStats`` of ``(M,)`` float32 tensors, ``None`` for statistics not requested.
    """
    del deterministic
    _cuda.dtype_code(hidden, DTYPES, "hidden (backend='cuda')")
    _cuda.check_device(hidden.device)
    return TokenStats(*CudaTokenStats.apply(hidden, weight, bias, labels.to(torch.int64).contiguous(), req,
                                            memory_budget, backward_possible(hidden, weight, bias)))

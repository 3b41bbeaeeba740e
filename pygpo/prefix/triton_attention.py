"""Autograd wrapper over the Triton prefix-sharing attention kernels (``pygpo.kernels.prefix_attention_*``).

Forward saves ``q, k, v, o`` and the base-2 log-sum-exp ``(B, Hq, S)``; backward recomputes the
probabilities tile by tile (FlashAttention-2, Dao 2023), so memory is ``O(S)`` per head beyond the
inputs. The block maps (which tiles to visit, which to mask; :mod:`pygpo.prefix.blocks`) are built from
the layout once per tile shape and device and cached on the layout, so every layer of a model forward
reuses them. Attention sinks enter the forward's running statistics; their gradient is one reduction
over the saved log-sum-exp here.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .blocks import build_block_map
from .layout import PrefixLayout

LOG2_E = 1.4426950408889634


class _PrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor], layout: PrefixLayout,
                scale: float, config: Any, window: Optional[int]) -> Tensor:
        from ..kernels.prefix_attention_fwd import prefix_attention_fwd

        device = q.device
        bounds = layout.token_bounds(device, sliding_window=window)
        fmap = build_block_map(layout, config.fwd_m, config.fwd_n, device, sliding_window=window)
        sinks2 = None if sinks is None else (sinks.detach().float() * LOG2_E).contiguous()
        o, lse2 = prefix_attention_fwd(
            q, k, v, bounds, *fmap.query_major(), scale, config.fwd_m, config.fwd_n,
            num_warps=config.fwd_warps, num_stages=config.fwd_stages, sinks2=sinks2,
        )
        ctx.save_for_backward(q, k, v, o, lse2, sinks2)
        ctx.sinks_dtype = None if sinks is None else sinks.dtype
        ctx.layout = layout
        ctx.scale = scale
        ctx.config = config
        ctx.window = window
        return o

    @staticmethod
    def backward(ctx: Any, do: Tensor) -> tuple[Optional[Tensor], ...]:
        from ..kernels.prefix_attention_bwd import attention_delta, prefix_attention_bwd

        q, k, v, o, lse2, sinks2 = ctx.saved_tensors
        delta = attention_delta(o, do)
        layout, cfg, window = ctx.layout, ctx.config, ctx.window
        device = q.device
        dq_map = build_block_map(layout, cfg.dq_m, cfg.dq_n, device, sliding_window=window)
        kv_map = build_block_map(layout, cfg.kv_m, cfg.kv_n, device, sliding_window=window)
        dq, dk, dv = prefix_attention_bwd(
            q, k, v, o, lse2, do, layout.token_bounds(device, sliding_window=window),
            dq_map.query_major(), (cfg.dq_m, cfg.dq_n), kv_map.key_major(), (cfg.kv_m, cfg.kv_n),
            ctx.scale, dq_launch=(cfg.dq_warps, cfg.dq_stages), kv_launch=(cfg.kv_warps, cfg.kv_stages),
            delta=delta, atomic_dq=cfg.atomic_dq,
        )
        dsinks = None
        if sinks2 is not None and ctx.needs_input_grad[3]:
            # dO . d(O)/d(sigma) = -P_sink Delta per query, P_sink = 2^(sigma log2 e - LSE2)
            p_sink = torch.exp2(sinks2[None, :, None] - lse2)
            dsinks = (-(p_sink * delta).sum((0, 2))).to(ctx.sinks_dtype)
        return dq, dk, dv, dsinks, None, None, None, None


def triton_prefix_attention(q: Tensor, k: Tensor, v: Tensor, layout: PrefixLayout, scale: float,
                            config: Any = None, sliding_window: Optional[int] = None,
                            sinks: Optional[Tensor] = None) -> Tensor:
    """Triton backend of :func:`pygpo.prefix.prefix_attention` (inputs already validated).

    ``config``: a ``pygpo.kernels.prefix_blocks.PrefixAttentionConfig`` (tile sizes), default chosen
    from the head dimension and dtype. ``sliding_window`` narrows the per-query bounds and block maps;
    the kernels are the same. ``sinks``: ``(Hq,)`` sink logits (differentiable).
    """
    from ..kernels.prefix_blocks import default_config

    if config is None:
        config = default_config(q.shape[-1], q.dtype)
    return _PrefixAttention.apply(q, k, v, sinks, layout, scale, config, sliding_window)

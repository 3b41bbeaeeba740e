"""Eager gradients: the loss's gradient w.r.t. hidden states and lm_head computed during the forward.

For a loss whose per-example value depends on that example's scores alone (DPO, IPO, cDPO, rDPO,
hinge, DPOP, SimPO, AlphaPO... most of the registry), the gradient of example ``b``'s share of the loss
w.r.t. its sequence scores ``U_b`` is known as soon as ``U_b`` is. The pass therefore walks the batch
in chunks of whole examples (rows sorted by example, at most ``memory_budget`` bytes of logit tile per
chunk) and, per chunk ``c`` of ``B_c`` examples:

1. ``z = H_c W^T`` once (the tile is kept), token statistics off it (:mod:`.tile_engines`);
2. ``U_c`` by the reducer (``sum`` or ``mean`` of the token log-probs), the head on the chunk's
   examples, and by autograd on those ``B_c x K`` scalars ``dL/dU_c`` of the chunk's share
   ``L_c = head(U_c).loss * B_c / B`` of the batch loss ``L = mean_b loss_b``;
3. ``g_t = dL/dU_{r(t)}`` (divided by the response length for ``mean``) for each token ``t``, and from
   the same tile ``dz = g (onehot(y) - softmax(z))``, ``dH_c = dRaw W``, ``dW += dRaw^T H_c``.

Three matmuls per policy row instead of four (the usual backward recomputes the logits the forward
did not keep), and a tile per chunk instead of none: the saving of Liger-Kernel's chunked losses, with
pygpo's row compaction (prompt rows cost nothing).

Not separable, so refused by the module's constructor (:meth:`FusedPreferenceLoss.eager_unsupported`):
losses with a batch-token-mean NLL term, ``NLL_mean(y_w) = -sum_b lp_w,b / sum_b |y_w,b|`` (``sft``,
``cpo``, ``orpo``, ``tpo_triple``), whose per-example share depends on the other examples' lengths.

Separability is not otherwise assumed, it is checked: after the chunks the head runs once on the whole batch,
and its loss and ``dL/dU`` must equal the chunks' (``NotSeparableError`` otherwise; the module then
needs ``eager_gradients=False``). The result carries the gradients to ``hidden``, ``weight`` and
``bias`` through :class:`_AttachGrads`; scores, per-example losses and metrics come out detached.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ..ops.backends.cuda_logprobs import matmul_dtype
from ..ops.backends.torch_tiles import acc_dtype
from ..ops.token_stats import StatRequest
from .layout import ResponseLayout
from .scores import TokenScores
from .tile_engines import TorchEngine, choose_engine

#: Default bytes of logit tile per chunk: 2048 rows of a 128k bf16 vocabulary, one DPO pair of
#: 1024-token responses.
DEFAULT_TILE_BUDGET = 512 * 2**20

#: ``head(policy, ref, inputs, check_finite=...)``: the loss head; ``check_finite=False`` skips its finite
#: check (the chunks' calls: the whole-batch call checks the same scores, naming the right example).
Head = Callable[..., Any]


class NotSeparableError(RuntimeError):
    """The loss of a batch is not the mean of per-example losses that depend on their own scores alone."""


class EagerResult(NamedTuple):
    loss: Tensor          # scalar, with gradients to hidden / weight / bias
    head: Any             # the head's output on the whole batch (detached)
    scores: TokenScores   # per valid token, layout order, detached
    policy_seq: Tensor    # (B, K) detached


class _AttachGrads(torch.autograd.Function):
    """``loss`` as a function of ``(hidden, weight, bias)`` whose gradient was computed already."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, d_h, d_w, d_b):
        ctx.save_for_backward(d_h, d_w, d_b)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (hidden, weight, bias))
        return loss.clone()

    @staticmethod
    def backward(ctx, g):
        grads = [None if d is None else _scaled_cast(d, g, dt) for d, dt in zip(ctx.saved_tensors, ctx.dtypes)]
        return (None, *grads, None, None, None)


class _NoGradient(torch.autograd.Function):
    """A value that looks differentiable but refuses a gradient: using it in a loss fails loudly instead
    of silently contributing nothing."""

    @staticmethod
    def forward(ctx, value, anchor, name):
        ctx.name = name
        return value.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError(
            f"{ctx.name} has no gradient with eager_gradients=True (only loss carries gradients, computed in "
            f"the forward); use eager_gradients=False to differentiate through {ctx.name}"
        )


def without_gradient(value: Tensor, anchor: Tensor, name: str) -> Tensor:
    """``value``, refusing any gradient that would flow back into ``anchor``'s graph (``_NoGradient``)."""
    if not (torch.is_grad_enabled() and anchor.requires_grad):
        return value.detach()
    return _NoGradient.apply(value.detach(), anchor, name)


def _scaled_cast(d: Tensor, g: Tensor, dtype: torch.dtype, rows: int = 8192) -> Tensor:
    """``(g * d).to(dtype)`` a block of rows at a time: no second accumulator-sized temporary (a float32
    dW is 2 GiB at V=128256, D=4096)."""
    g = g.to(d.dtype)
    out = torch.empty(d.shape, device=d.device, dtype=dtype)
    for r0 in range(0, d.shape[0], rows):
        out[r0:r0 + rows].copy_(d[r0:r0 + rows] * g)
    return out


def _example_chunks(counts: list[int], rows_per_chunk: int) -> list[tuple[int, int]]:
    """Consecutive example ranges ``[e0, e1)`` of at most ``rows_per_chunk`` rows (at least one example)."""
    chunks, e0, rows = [], 0, 0
    for e, n in enumerate(counts):
        if e > e0 and rows + n > rows_per_chunk:
            chunks.append((e0, e))
            e0, rows = e, 0
        rows += n
    if e0 < len(counts):
        chunks.append((e0, len(counts)))
    return chunks


def _slice_inputs(inputs: dict, e0: int, e1: int, batch: int) -> dict:
    """Per-example inputs (leading dimension ``B``) restricted to examples ``[e0, e1)``."""
    return {k: (v[e0:e1] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch else v)
            for k, v in inputs.items()}


def _rows_per_chunk(engine, hidden: Tensor, vocab: int, memory_budget: Optional[int]) -> int:
    """Rows whose full-vocabulary tile fits ``memory_budget`` bytes (at least one)."""
    element = engine.bytes_per_element if isinstance(engine, TorchEngine) else matmul_dtype(hidden).itemsize
    budget = DEFAULT_TILE_BUDGET if memory_budget is None else int(memory_budget)
    return max(1, budget // (vocab * element))


@torch.no_grad()
def reference_logps(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, *, req: StatRequest,
                    backend: str, memory_budget: Optional[int]) -> Tensor:
    """``(M,)`` log-probs of ``labels (M,)`` under ``softmax(hidden (M, D) @ weight.T + bias)``, by the
    eager pass's own engine a tile of rows at a time (the reference model's scores, no gradient)."""
    req = StatRequest(temperature=req.temperature, softcap=req.softcap)
    engine = choose_engine(hidden, req, backend)
    rows = _rows_per_chunk(engine, hidden, weight.shape[0], memory_budget)
    out = torch.empty(hidden.shape[0], device=hidden.device, dtype=acc_dtype(hidden))
    for r0 in range(0, hidden.shape[0], rows):
        part = slice(r0, r0 + rows)
        out[part] = engine.stats(hidden[part], weight, bias, labels[part]).logprobs
        engine.release()
    return out


def _call(head: Head, policy: Tensor, ref: Optional[Tensor], inputs: dict, *, check_finite: bool = True) -> Any:
    """The head on ``(B', K)`` scores, or on ``(B',)`` ones for ``K = 1`` (unpaired heads)."""
    if policy.shape[1] == 1:
        return head(policy[:, 0], None if ref is None else ref[:, 0], inputs, check_finite=check_finite)
    return head(policy, ref, inputs, check_finite=check_finite)


def _close(a: Tensor, b: Tensor) -> Tensor:
    """0-d bool tensor: ``allclose(a, b, rtol=1e-4, atol=1e-6 max|b| + 1e-12)``, computed on the device
    (the caller reads several such flags at once)."""
    a, b = a.detach(), b.detach()
    if not b.numel():
        return torch.ones((), dtype=torch.bool, device=b.device)
    atol = 1e-6 * b.abs().max() + 1e-12
    return (((a - b).abs() <= atol + 1e-4 * b.abs()) | (a == b)).all()


def eager_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    layout: ResponseLayout,
    ref_seq: Optional[Tensor],
    head: Head,
    head_inputs: dict,
    *,
    reducer: str,
    req: StatRequest,
    backend: str,
    memory_budget: Optional[int],
) -> EagerResult:
    """The batch loss with its gradients computed in the forward (module docstring).

    Args:
        hidden: ``(M, D)`` policy rows of the valid tokens in layout order (a differentiable gather).
        weight, bias: ``(V, D)`` lm_head weight and ``(V,)`` bias or ``None``.
        labels: ``(M,)`` int64 labels of those rows.
        layout: the batch's :class:`ResponseLayout` (``M`` tokens, ``B`` examples of ``K`` responses).
        ref_seq: ``(B, K)`` reference sequence scores (after the reducer), or ``None``.
        head: ``head(policy (B', K) or (B',), ref or None, inputs) -> output with .loss``.
        head_inputs: the head's inputs for the whole batch (per-example ones are sliced per chunk).
        reducer: ``"sum"`` or ``"mean"``.
        req: the statistics to compute (metrics) and the logit transform.
        backend, memory_budget: engine choice (``"torch"`` forces the torch engine) and tile bytes.
    """
    b, k = layout.batch_size, layout.responses_per_example
    dev, acc = hidden.device, acc_dtype(hidden)
    engine = choose_engine(hidden, req, backend)
    rows_per_chunk = _rows_per_chunk(engine, hidden, weight.shape[0], memory_budget)
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    h_all, w, bias_d = hidden.detach(), weight.detach(), None if bias is None else bias.detach()

    response = layout.token_response.to(dev)
    example = response // k
    order = torch.sort(example, stable=True).indices
    counts = [sum(layout.host_lengths[e * k:(e + 1) * k]) for e in range(b)]  # host ints: no device read
    lengths = layout.lengths.to(dev).clamp(min=1).to(acc)

    m = hidden.shape[0]
    per_token = {name: torch.zeros(m, device=dev, dtype=acc) for name in ("logprobs", "entropy", "mean_logit", "is_top1")}
    policy_seq = torch.zeros(b, k, device=dev, dtype=acc)
    d_u = torch.zeros(b, k, device=dev, dtype=acc)
    d_h = torch.zeros(hidden.shape, device=dev, dtype=acc) if need_grad and hidden.requires_grad else None
    d_w = torch.zeros(weight.shape, device=dev, dtype=acc) if need_grad and weight.requires_grad else None
    d_b = torch.zeros(weight.shape[0], device=dev, dtype=acc) if need_grad and bias is not None and bias.requires_grad else None
    chunk_loss = torch.zeros((), device=dev, dtype=acc)

    t0 = 0
    for e0, e1 in _example_chunks(counts, rows_per_chunk):
        t1 = t0 + sum(counts[e0:e1])
        idx = order[t0:t1]
        t0 = t1
        h_c, y_c = h_all.index_select(0, idx), labels.index_select(0, idx)
        stats = engine.stats(h_c, w, bias_d, y_c)
        for name in per_token:
            value = getattr(stats, name)
            if value is not None:
                per_token[name][idx] = value.to(acc)
        resp = response.index_select(0, idx) - e0 * k
        u_c = torch.zeros((e1 - e0) * k, device=dev, dtype=acc).index_add_(0, resp, stats.logprobs.to(acc)).view(-1, k)
        if reducer == "mean":
            u_c = u_c / lengths[e0:e1]
        policy_seq[e0:e1] = u_c
        if not need_grad:
            engine.release()
            continue
        leaf = u_c.detach().requires_grad_()
        ref_c = None if ref_seq is None else ref_seq[e0:e1]
        with torch.enable_grad():
            out = _call(head, leaf, ref_c, _slice_inputs(head_inputs, e0, e1, b), check_finite=False)
            share = out.loss.to(acc) * ((e1 - e0) / b)
            (du_c,) = torch.autograd.grad(share, leaf)
        chunk_loss += share.detach()
        d_u[e0:e1] = du_c
        g = du_c.reshape(-1).index_select(0, resp)
        if reducer == "mean":
            g = g / lengths[e0:e1].reshape(-1).index_select(0, resp)
        dh_c = engine.grads(g, h_c, w, y_c, d_w, d_b, d_h is not None)
        if d_h is not None:
            d_h.index_copy_(0, idx, dh_c.to(acc))

    scores = TokenScores(per_token["logprobs"], None, None,
                         per_token["entropy"] if req.entropy else None,
                         per_token["mean_logit"] if req.mean_logit else None, None,
                         per_token["is_top1"] if req.top1 else None)
    full_in = policy_seq.detach().requires_grad_(need_grad)
    with torch.enable_grad() if need_grad else torch.no_grad():
        out = _call(head, full_in, ref_seq, head_inputs)
    if not need_grad:
        return EagerResult(out.loss.detach(), out, scores, policy_seq)
    (du_full,) = torch.autograd.grad(out.loss.to(acc), full_in)
    if not bool(_close(chunk_loss, out.loss.to(acc)) & _close(d_u, du_full)):  # one device read
        raise NotSeparableError(
            "eager_gradients=True needs a loss that is the mean of per-example losses, each depending on its "
            "own example's scores only; this one is not (the chunked and whole-batch losses or their "
            "gradients differ): use eager_gradients=False"
        )
    loss = _AttachGrads.apply(out.loss.detach(), hidden, weight, bias, d_h, d_w, d_b)
    return EagerResult(loss, out, scores, policy_seq)

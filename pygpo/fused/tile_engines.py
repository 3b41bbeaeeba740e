"""One full-vocabulary logit tile of a chunk of rows, kept between its statistics and its gradient.

The eager-gradient pass (:mod:`.eager`) computes, for a chunk of rows, the logit tile ``z = H_c W^T``
once, reads the token statistics off it, and, once the loss has given each row its upstream gradient
``g_i = d loss / d log p(y_i)``, turns the *same* tile into the logit gradient
``dz = g_i (onehot(y_i) - softmax(z_i))`` and then into ``dH_c = dRaw W`` and ``dW += dRaw^T H_c``:
three matmuls per row instead of the four of a forward that forgets its logits and a backward that
recomputes them.

Two engines, same math (the logit transform ``softcap * tanh(raw / softcap) / temperature`` included):

* :class:`EpilogueEngine`: the tile in the input dtype from ``torch.mm`` (cuBLAS on a GPU), folded
  and differentiated in place by the ``pygpo._C`` epilogue kernels (their host twins for CPU tensors),
  one read for the statistics and one read-write for the gradient;
* :class:`TorchEngine`: the tile in float32 (float64 for float64 inputs) with torch elementwise code,
  for any device and any dtype, when ``pygpo._C`` is absent.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _cuda
from ..ops.backends import cuda_logprobs
from ..ops.backends.torch_tiles import acc_dtype, add_label_grad, backprop_tile, floor_log, label_logit, tile_logits
from ..ops.token_stats import StatRequest, TokenStats

ALL = slice(None)


class TorchEngine:
    """Statistics and gradient of a kept float32 (float64) tile, in torch."""

    #: bytes per tile element: the logits, their softmax / gradient, and the softcap's tanh
    bytes_per_element = 12

    def __init__(self, req: StatRequest):
        self.req = req

    def stats(self, h: Tensor, weight: Tensor, bias: Optional[Tensor], y: Tensor) -> TokenStats:
        req = self.req
        self.z, self.tanh = tile_logits(h, weight, bias, ALL, req)
        z = self.z
        self.lse = torch.logsumexp(z, dim=1)
        zy = label_logit(z, y, 0)
        entropy = mean_logit = top1 = None
        if req.entropy:
            # -sum p log p with log p floored where p == 0 exactly: 0 log 0 = 0 under a -inf (masked) logit
            log_p = floor_log(z - self.lse[:, None])
            entropy = -(log_p.exp() * log_p).sum(1)
        if req.mean_logit:
            mean_logit = z.mean(1)
        if req.top1:
            top1 = (zy >= z.amax(1)).float()
        return TokenStats(zy - self.lse, self.lse, entropy, None, mean_logit, top1)

    def grads(self, g: Tensor, h: Tensor, weight: Tensor, y: Tensor, d_w: Optional[Tensor],
              d_b: Optional[Tensor], need_hidden: bool) -> Optional[Tensor]:
        """Adds the chunk's ``dW``, ``db`` into the accumulators; returns its ``dH`` (accumulation dtype)."""
        dz = torch.exp_(self.z.sub_(self.lse[:, None])).mul_(-g[:, None].to(self.z.dtype))
        add_label_grad(dz, y, 0, g.to(dz.dtype))
        d_h = torch.zeros(h.shape, device=h.device, dtype=acc_dtype(h)) if need_hidden else None
        backprop_tile(dz, self.tanh, self.req, h, weight, ALL, ALL, (d_h, d_w, d_b))
        self.release()
        return d_h

    def release(self) -> None:
        """Drop the kept tile."""
        self.z = self.tanh = self.lse = None


class EpilogueEngine:
    """Statistics and gradient of a kept input-dtype tile, by the ``pygpo._C`` epilogue kernels."""

    bytes_per_element = 2  # bf16/fp16 tiles; float32 inputs are sized by their own element size

    def __init__(self, req: StatRequest):
        self.req = req

    def stats(self, h: Tensor, weight: Tensor, bias: Optional[Tensor], y: Tensor) -> TokenStats:
        req, n, vocab = self.req, h.shape[0], weight.shape[0]
        self.tile = cuda_logprobs.mm_tile(h, weight, ALL)
        f32 = dict(device=h.device, dtype=torch.float32)
        wanted = (True, True, req.entropy, False, req.mean_logit, req.top1)
        outs = [torch.empty(n, **f32) if w else None for w in wanted]
        self.bias = cuda_logprobs.tile_bias(bias, ALL, self.tile)  # held: the kernels get its address only
        self.args = cuda_logprobs.epilogue_args(self.tile, self.bias, y, 0, vocab, req)
        fold = dict(zip(TokenStats._fields, (_cuda.ptr(o) for o in outs)))
        cuda_logprobs.launch("epilogue_fwd", self.tile, self.args, _cuda.make("FoldArgs", state=0, first=1, last=1, **fold))
        self.lse = outs[1]
        return TokenStats(*outs)

    def grads(self, g: Tensor, h: Tensor, weight: Tensor, y: Tensor, d_w: Optional[Tensor],
              d_b: Optional[Tensor], need_hidden: bool) -> Optional[Tensor]:
        """Adds the chunk's ``dW``, ``db`` into the accumulators; returns its ``dH`` (float32)."""
        tile, vocab = self.tile, weight.shape[0]
        if d_b is not None and tile.dtype != d_b.dtype:
            # the bias sums dRaw before it is rounded to the matmul dtype; the widened tile keeps the bias
            # the forward added (rounded to the tile dtype), so dRaw matches the statistics
            tile = tile.to(d_b.dtype)
            self.bias = cuda_logprobs.tile_bias(self.bias, ALL, tile)
            self.args = cuda_logprobs.epilogue_args(tile, self.bias, y, 0, vocab, self.req)
        g = g.float().contiguous()
        absent = dict.fromkeys(("g_lse", "g_entropy", "entropy", "g_log_sum_p2", "log_sum_p2", "g_mean_logit"), 0)
        grad = _cuda.make("GradArgs", lse=self.lse.data_ptr(), g_logprobs=g.data_ptr(), **absent)
        cuda_logprobs.launch("epilogue_bwd", tile, self.args, grad)
        d_h = torch.zeros(h.shape, device=h.device, dtype=torch.float32) if need_hidden else None
        cuda_logprobs.backprop_raw_tile(tile, h, weight, ALL, d_h, d_w, d_b)
        self.release()
        return d_h

    def release(self) -> None:
        """Drop the kept tile."""
        self.tile = self.bias = self.args = self.lse = None


def choose_engine(hidden: Tensor, req: StatRequest, backend: str) -> TorchEngine | EpilogueEngine:
    """The epilogue engine where ``pygpo._C`` runs these inputs (not float64, no ``log sum p^2``),
    else torch; ``backend="torch"`` forces torch."""
    usable = (_cuda.supports(hidden.device) and hidden.dtype in cuda_logprobs.DTYPES and not req.log_sum_p2
              and backend in ("auto", "cuda", "triton"))
    return EpilogueEngine(req) if usable else TorchEngine(req)

"""``PrefixLayout``: where the prompts and responses of a prefix-shared batch sit, and what each token sees.

A prefix-shared row holds one or more *documents* back to back, each laid out as

    [ prompt (P tokens) | response_1 (R_1) | response_2 (R_2) | ... | response_K (R_K) ]

followed by padding up to the row length ``S``. This is the layout of "Accelerating Direct Preference
Optimization with Prefix Sharing" (Wang & Hegde, 2024): the prompt is computed once and every response
attends to it, while responses never attend to each other.

The mask of a query at row offset ``q`` and a key at offset ``k`` of the same row is

    allowed(q, k) = k <= q  AND  doc(k) == doc(q)  AND  NOT (q in response i, k in response j, j != i)

Because segments are contiguous, the keys a query sees are the union of two intervals,

    allowed(q, k) = (lo1[q] <= k < hi1[q])  OR  (lo2[q] <= k <= q)

with, for a document starting at ``s`` with prompt length ``P``:

* prompt tokens and tokens of the *first* response: ``lo2 = s``, empty first interval
  (``lo1 = hi1 = s``); the first response is a plain causal continuation of its prompt;
* tokens of response ``i >= 2`` starting at ``r_i``: ``[lo1, hi1) = [s, s + P)`` and ``lo2 = r_i``;
* padding tokens see only themselves (``lo1 = hi1 = lo2 = q``) so that every softmax row is finite.

These three ``int32`` numbers per token (:meth:`PrefixLayout.token_bounds`, ``O(S)`` memory) are all the
Triton kernels read.

A *sliding window* of ``W`` keys (Mistral, Gemma 2/3 local layers: a query at position ``p`` sees keys at
positions ``> p - W``) counts positions, not row offsets: a later response restarts at position ``P``,
so it sees the prompt's last keys exactly as its unshared ``prompt + response`` sequence would. Both
intervals only lose keys at their lower end, so a window is two tighter lower bounds,

    lo1 <- min(hi1, lo1 + max(0, pos[q] - W + 1)),    lo2 <- max(lo2, q - W + 1)

(``lo1`` of a response is its document's start, whose position is 0; ``[lo2, q]`` is contiguous in
positions), and everything built from the bounds (block maps, kernels, the dense mask) follows. The torch backend works span by span (:meth:`PrefixLayout.spans`); the dense
``S x S`` mask (:meth:`PrefixLayout.dense_mask`) exists only for the reference implementation.

The layout itself is *compact*: one entry per document (row, start, prompt length) and one per
response (document, start, length), in the order responses are scored.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..ops.transfer import to_device


def _as_index_tensor(name: str, values: Any) -> Tensor:
    t = torch.as_tensor(values, device="cpu")
    # integers only: a float offset or length would otherwise be truncated without a word
    if t.numel() and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name} must hold integers, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(t.shape)}")
    return t.to(torch.int64)


def _as_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"layout needs {name} to be a positive int, got {value!r}")
    return int(value)


def check_sliding_window(sliding_window: Any) -> Optional[int]:
    """``None`` or the window as a positive ``int``; anything else raises ``ValueError`` naming it."""
    if sliding_window is None:
        return None
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, numbers.Integral) or sliding_window < 1:
        raise ValueError(f"sliding_window must be None or a positive int (keys per query), got {sliding_window!r}")
    return int(sliding_window)


class PrefixLayout:
    """Compact description of a prefix-shared batch of ``batch_size`` rows of ``seq_len`` tokens.

    Attributes (all ``int64`` CPU tensors):
        doc_row: ``(n_docs,)`` row of each document.
        doc_start: ``(n_docs,)`` offset of the document's first prompt token in its row.
        prompt_len: ``(n_docs,)`` prompt length ``P >= 1``.
        resp_doc: ``(n_resp,)`` document of each response; responses of one document are consecutive
            and in their order inside the row.
        resp_start: ``(n_resp,)`` offset of the response's first token in its row.
        resp_len: ``(n_resp,)`` response length ``R >= 1``.

    Derived, cached per device: :meth:`token_bounds`, :meth:`position_ids`, :meth:`dense_mask`, and the
    block maps of :mod:`pygpo.prefix.blocks`.
    """

    def __init__(
        self,
        batch_size: int,
        seq_len: int,
        doc_row: Any,
        doc_start: Any,
        prompt_len: Any,
        resp_doc: Any,
        resp_start: Any,
        resp_len: Any,
    ) -> None:
        self.batch_size = _as_size("batch_size", batch_size)
        self.seq_len = _as_size("seq_len", seq_len)
        self.doc_row = _as_index_tensor("doc_row", doc_row)
        self.doc_start = _as_index_tensor("doc_start", doc_start)
        self.prompt_len = _as_index_tensor("prompt_len", prompt_len)
        self.resp_doc = _as_index_tensor("resp_doc", resp_doc)
        self.resp_start = _as_index_tensor("resp_start", resp_start)
        self.resp_len = _as_index_tensor("resp_len", resp_len)
        self._cache: dict[Any, Any] = {}
        self._validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_lengths(
        cls, rows: Sequence[Sequence[tuple[int, Sequence[int]]]], seq_len: Optional[int] = None
    ) -> "PrefixLayout":
        """Layout of rows given as ``[[(P, [R_1, ..., R_K]), ...], ...]``, documents back to back from offset 0.

        ``seq_len`` defaults to the longest row. Used by :func:`pygpo.prefix.pack` and by tests.
        """
        doc_row, doc_start, prompt_len, resp_doc, resp_start, resp_len = [], [], [], [], [], []
        longest = 0
        for b, docs in enumerate(rows):
            offset = 0
            for p, lens in docs:
                doc_id = len(doc_row)
                doc_row.append(b)
                doc_start.append(offset)
                prompt_len.append(int(p))
                offset += int(p)
                for r in lens:
                    resp_doc.append(doc_id)
                    resp_start.append(offset)
                    resp_len.append(int(r))
                    offset += int(r)
            longest = max(longest, offset)
        return cls(
            len(rows), longest if seq_len is None else seq_len,
            doc_row, doc_start, prompt_len, resp_doc, resp_start, resp_len,
        )

    def _validate(self) -> None:
        n_docs = self.doc_row.numel()
        if not (self.doc_start.numel() == self.prompt_len.numel() == n_docs):
            raise ValueError("layout: doc_row, doc_start and prompt_len must have the same length (one entry per document), "
                             f"got {n_docs}, {self.doc_start.numel()} and {self.prompt_len.numel()}")
        if not (self.resp_start.numel() == self.resp_len.numel() == self.resp_doc.numel()):
            raise ValueError("layout: resp_doc, resp_start and resp_len must have the same length (one entry per response), "
                             f"got {self.resp_doc.numel()}, {self.resp_start.numel()} and {self.resp_len.numel()}")
        if n_docs == 0:
            raise ValueError("layout: needs at least one document (doc_row is empty)")
        if (self.prompt_len < 1).any():
            raise ValueError("layout: every prompt needs at least one token (prompt_len >= 1)")
        if (self.resp_len < 1).any():
            raise ValueError("layout: every response needs at least one token (resp_len >= 1)")
        if ((self.doc_row < 0) | (self.doc_row >= self.batch_size)).any():
            raise ValueError(f"layout: doc_row must lie in [0, batch_size={self.batch_size})")
        if ((self.resp_doc < 0) | (self.resp_doc >= n_docs)).any():
            raise ValueError(f"layout: resp_doc must lie in [0, n_docs={n_docs})")
        if self.resp_doc.numel() and (self.resp_doc[1:] < self.resp_doc[:-1]).any():
            raise ValueError("layout: responses must be grouped by document, in document order")
        # Each document must be contiguous: prompt, then its responses one after the other.
        end = self.doc_start + self.prompt_len
        expected = end.clone()
        n_resp_of_doc = torch.bincount(self.resp_doc, minlength=n_docs)
        first = torch.cumsum(n_resp_of_doc, 0) - n_resp_of_doc
        for i in range(self.resp_doc.numel()):
            d = int(self.resp_doc[i])
            if int(self.resp_start[i]) != int(expected[d]):
                raise ValueError(
                    f"layout: response {i} starts at {int(self.resp_start[i])}, but document {d} continues at "
                    f"{int(expected[d])} (each document is [prompt | response_1 | ... | response_K])"
                )
            expected[d] += self.resp_len[i]
        self._doc_end = expected
        self._first_resp = first
        if (self.doc_start < 0).any() or (expected > self.seq_len).any():
            raise ValueError(f"layout: a document runs outside [0, seq_len={self.seq_len})")
        # Documents of one row must not overlap.
        order = torch.argsort(self.doc_row * (self.seq_len + 1) + self.doc_start)
        rows, starts, ends = self.doc_row[order], self.doc_start[order], expected[order]
        same_row = rows[1:] == rows[:-1]
        if (same_row & (starts[1:] < ends[:-1])).any():
            raise ValueError("layout: documents of one row overlap")

    # ------------------------------------------------------------------ compact views
    @property
    def num_documents(self) -> int:
        return self.doc_row.numel()

    @property
    def num_responses(self) -> int:
        return self.resp_doc.numel()

    @property
    def shape(self) -> tuple[int, int]:
        """``(batch_size, seq_len)``: the shape of ``input_ids`` this layout describes."""
        return self.batch_size, self.seq_len

    def rows(self) -> list[list[dict[str, Any]]]:
        """Per row, its documents as ``{"start", "prompt_len", "resp_starts", "resp_lens"}`` (plain ints)."""
        out: list[list[dict[str, Any]]] = [[] for _ in range(self.batch_size)]
        for d in range(self.num_documents):
            sel = (self.resp_doc == d).nonzero().flatten()
            out[int(self.doc_row[d])].append({
                "start": int(self.doc_start[d]),
                "prompt_len": int(self.prompt_len[d]),
                "resp_starts": self.resp_start[sel].tolist(),
                "resp_lens": self.resp_len[sel].tolist(),
            })
        for docs in out:
            docs.sort(key=lambda doc: doc["start"])
        return out

    def __repr__(self) -> str:
        return (f"PrefixLayout(batch_size={self.batch_size}, seq_len={self.seq_len}, "
                f"documents={self.num_documents}, responses={self.num_responses})")

    # ------------------------------------------------------------------ derived per-token tensors
    def _segments(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Per segment (prompts, then responses): row, start, length, lo1, hi1, lo2 (all int64, CPU)."""
        d = self.resp_doc
        ds = self.doc_start[d]
        is_first = torch.arange(self.num_responses) == self._first_resp[d]
        # First response: causal continuation of the prompt. Later ones: prompt interval + own interval.
        r_lo1 = ds
        r_hi1 = torch.where(is_first, ds, ds + self.prompt_len[d])
        r_lo2 = torch.where(is_first, ds, self.resp_start)
        row = torch.cat([self.doc_row, self.doc_row[d]])
        start = torch.cat([self.doc_start, self.resp_start])
        length = torch.cat([self.prompt_len, self.resp_len])
        lo1 = torch.cat([self.doc_start, r_lo1])
        hi1 = torch.cat([self.doc_start, r_hi1])
        lo2 = torch.cat([self.doc_start, r_lo2])
        return row, start, length, lo1, hi1, lo2

    def _token_index(self) -> tuple[Tensor, Tensor, Tensor]:
        """For every token covered by a segment: its flat index ``row * S + offset``, its segment, and its
        offset inside the segment (all int64, CPU; segments ordered as in :meth:`_segments`)."""
        row, start, length = self._segments()[:3]
        seg = torch.repeat_interleave(torch.arange(length.numel()), length)
        seg_first = torch.cumsum(length, 0) - length
        offset_in_seg = torch.arange(seg.numel()) - seg_first[seg]
        flat = row[seg] * self.seq_len + start[seg] + offset_in_seg
        return flat, seg, offset_in_seg

    def effective_window(self, sliding_window: Any) -> Optional[int]:
        """``sliding_window`` checked (:func:`check_sliding_window`), and ``None`` when it hides no key: every
        position is below ``seq_len``, so a window of ``seq_len`` or more is no window (and a huge one never
        meets int64 arithmetic, where ``2**63`` would wrap around)."""
        window = check_sliding_window(sliding_window)
        return None if window is None or window >= self.seq_len else window

    def token_bounds(self, device: torch.device | str = "cpu", *, sliding_window: Optional[int] = None) -> Tensor:
        """``(B, 3, S)`` int32: ``lo1, hi1, lo2`` per token, so that the keys visible to query ``q`` are
        ``[lo1, hi1) U [lo2, q]`` (see the module docstring), narrowed to the last ``sliding_window``
        positions when one is given. Cached per device and window."""
        device = torch.device(device)
        window = self.effective_window(sliding_window)
        key = ("bounds", device, window)
        if key not in self._cache:
            if window is None:
                seg_bounds = torch.stack(self._segments()[3:], dim=1)  # (n_segments, 3)
                flat, seg, _ = self._token_index()
                # Padding sees only itself: lo1 = hi1 = lo2 = q.
                grid = torch.arange(self.seq_len).repeat(self.batch_size)[:, None].repeat(1, 3)
                grid[flat] = seg_bounds[seg]
                bounds = grid.view(self.batch_size, self.seq_len, 3).permute(0, 2, 1).to(torch.int32)
            else:
                lo1, hi1, lo2 = self.token_bounds("cpu").long().unbind(1)
                pos = self.position_ids("cpu")
                q = torch.arange(self.seq_len)
                lo1 = torch.minimum(hi1, lo1 + (pos - window + 1).clamp_min(0))
                lo2 = torch.maximum(lo2, q - window + 1)
                bounds = torch.stack((lo1, hi1, lo2), 1).to(torch.int32)
            self._cache[key] = to_device(bounds.contiguous(), device)
        return self._cache[key]

    def position_ids(self, device: torch.device | str = "cpu") -> Tensor:
        """``(B, S)`` int64 position ids: ``0..P-1`` on a prompt and ``P..P+R-1`` on each of its responses,
        exactly the positions of an unshared ``prompt + response`` sequence; 0 on padding."""
        device = torch.device(device)
        key = ("pos", device)
        if key not in self._cache:
            base = torch.cat([torch.zeros(self.num_documents, dtype=torch.int64), self.prompt_len[self.resp_doc]])
            flat, seg, offset_in_seg = self._token_index()
            pos = torch.zeros(self.batch_size * self.seq_len, dtype=torch.int64)
            pos[flat] = base[seg] + offset_in_seg
            self._cache[key] = to_device(pos.view(self.batch_size, self.seq_len), device)
        return self._cache[key]

    def dense_mask(self, device: torch.device | str = "cpu", *, sliding_window: Optional[int] = None) -> Tensor:
        """``(B, 1, S, S)`` bool, True where query ``q`` may attend to key ``k`` (within the last
        ``sliding_window`` positions, when given). ``O(B S^2)`` memory: only the dense reference and tests
        use it. Cached per device and window (one mask serves every layer of a forward)."""
        device = torch.device(device)
        key = ("dense", device, self.effective_window(sliding_window))
        if key not in self._cache:
            bounds = self.token_bounds(device, sliding_window=sliding_window).long()
            lo1, hi1, lo2 = (bounds[:, i, :, None] for i in range(3))
            k = torch.arange(self.seq_len, device=device)
            q = k[:, None]
            mask = ((k >= lo1) & (k < hi1)) | ((k >= lo2) & (k <= q))
            self._cache[key] = mask[:, None]
        return self._cache[key]

    def spans(self) -> list[list[tuple[str, int, int, int, int]]]:
        """Per row, ``(kind, start, end, prefix_start, prefix_end)`` spans covering ``[0, S)`` in order.

        ``"causal"``: ``[start, end)`` attends causally to itself (a prompt with its first response);
        ``"branch"``: a later response, attending to its prompt ``[prefix_start, prefix_end)`` fully and
        to itself causally; ``"pad"``: tokens outside every document (each sees only itself).
        The torch backend runs one SDPA per span. Cached.
        """
        def build() -> list[list[tuple[str, int, int, int, int]]]:
            rows: list[list[tuple[str, int, int, int, int]]] = [[] for _ in range(self.batch_size)]
            docs = sorted(range(self.num_documents), key=lambda d: (int(self.doc_row[d]), int(self.doc_start[d])))
            resp_of: list[list[int]] = [[] for _ in range(self.num_documents)]
            for i, d in enumerate(self.resp_doc.tolist()):
                resp_of[d].append(i)
            cursor = [0] * self.batch_size
            for d in docs:
                b, ds, p = int(self.doc_row[d]), int(self.doc_start[d]), int(self.prompt_len[d])
                if ds > cursor[b]:
                    rows[b].append(("pad", cursor[b], ds, 0, 0))
                resp = resp_of[d]
                first_end = ds + p + (int(self.resp_len[resp[0]]) if resp else 0)
                rows[b].append(("causal", ds, first_end, 0, 0))
                for i in resp[1:]:
                    rs = int(self.resp_start[i])
                    rows[b].append(("branch", rs, rs + int(self.resp_len[i]), ds, ds + p))
                cursor[b] = int(self._doc_end[d])
            for b in range(self.batch_size):
                if cursor[b] < self.seq_len:
                    rows[b].append(("pad", cursor[b], self.seq_len, 0, 0))
            return rows

        return self.cached("spans", build)

    def cached(self, key: Any, build: Any) -> Any:
        """Memoise ``build()`` under ``key`` on this layout (used for block maps)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def check_shape(self, name: str, shape: Sequence[int], batch_dim: int, seq_dim: int) -> None:
        """Raise ``ValueError`` naming ``name`` unless ``shape[batch_dim], shape[seq_dim] == (B, S)``."""
        if len(shape) <= max(batch_dim, seq_dim):
            raise ValueError(f"{name} must have the layout's batch_size={self.batch_size} at dimension {batch_dim} and "
                             f"seq_len={self.seq_len} at dimension {seq_dim}, got shape {tuple(shape)} (too few dimensions)")
        got = (int(shape[batch_dim]), int(shape[seq_dim]))
        if got != (self.batch_size, self.seq_len):
            raise ValueError(
                f"layout does not match {name}: the layout describes batch_size={self.batch_size}, "
                f"seq_len={self.seq_len}, but {name} has shape {tuple(shape)} (batch {got[0]}, sequence {got[1]})"
            )

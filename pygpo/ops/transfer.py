"""Host -> device copies that do not make the host wait for the device, and the host copies they came from.

A blocking copy from pageable host memory (``t.to("cuda")``) runs ``cudaMemcpyAsync`` and then
synchronises the stream, so the host stalls until every kernel queued before it has finished. Index
tensors built on the host (a prefix batch's targets, a layout's tables) go through pinned memory with
``non_blocking=True`` instead (:func:`to_device`): the copy is queued behind the work already on the
stream and the host moves on. The caching host allocator keeps the pinned block alive until the copy
has run.

The host tensor a copy came from is remembered (:func:`host_twin`), so a check of the values, such as
the label range of :func:`pygpo.ops.validation.check_label_range`, reads the host copy for free instead
of reading the device copy back (a sync). The pairing lapses as soon as either tensor is modified in
place (their version counters move), so a stale host copy is not trusted. Inference tensors, which
keep no version counter, are never paired. Writes that bypass the counters (through ``.data``, a numpy
view, DLPack or a custom kernel) are not seen: do not change a copied tensor that way. Copies to a GPU
are paired with the private pinned copy made for the transfer, which nothing else can write to.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

# device copy -> (host original, its version, the device copy's version) at the time of the copy
_TWINS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """``t`` on ``device``: queued without a host sync when ``t`` is a host tensor and ``device`` a GPU.

    Anything else (already there, device -> host, between devices) is an ordinary ``t.to(device)``. The
    host tensor must not be modified in place before the device has read it (pinning copies it first).
    """
    device = torch.device(device)
    if t.device.type != "cpu":
        return t.to(device)
    source = t.pin_memory() if device.type == "cuda" and not t.is_pinned() else t
    out = source.to(device, non_blocking=True)
    # inference tensors (made or copied under torch.inference_mode) have no version counter to watch
    if out is not t and out is not source and not (source.is_inference() or out.is_inference()):
        # paired with the private pinned copy where there is one: no alias of the caller's can change it
        _TWINS[out] = (source, source._version, out._version)
    return out


def host_twin(t: Tensor) -> Optional[Tensor]:
    """The host tensor that :func:`to_device` copied ``t`` from, if neither was modified in place since;
    else ``None``. Its values equal ``t``'s, and reading them costs no device sync."""
    entry = _TWINS.get(t)
    if entry is None:
        return None
    host, host_version, version = entry
    if host._version != host_version or t._version != version:
        return None
    return host

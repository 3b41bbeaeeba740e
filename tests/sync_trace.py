"""Host <-> device synchronisation audit on CPU: which ops of a call would stall the host on a GPU.

A CUDA host thread runs ahead of the GPU until it needs a value the GPU has not produced yet, or until
a copy from pageable host memory waits for the stream. On CPU nothing stalls, but the same ops run, so
this helper records them while a callable runs:

    with SyncTrace(device_tensors=[hidden, weight, labels], modules=[model]) as trace:
        fused_linear_logprobs(hidden, weight, labels).sum().backward()
    trace.sites()        # Counter of "pygpo/ops/validation.py::check_label_range" -> count
    print(trace.report())

What counts as a synchronisation (each would block the host on CUDA tensors):

* reading a value: ``aten._local_scalar_dense`` (``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``),
  ``aten.is_nonzero``, ``aten.equal``; ``Tensor.tolist()`` / ``.numpy()`` (seen at the Python level:
  on CPU they dispatch no aten op);
* ops whose output size depends on the data: ``aten.nonzero``, ``aten.masked_select``, ``aten.unique*``,
  ``aten.bincount`` (CUDA reads the maximum), ``aten.repeat_interleave.Tensor`` without
  ``output_size``, and indexing or index-assignment with a boolean mask (``aten.index.Tensor`` /
  ``aten.index_put_`` with a bool index, which run ``nonzero`` inside);
* copies between host and device: ``.to(device)`` / ``torch.tensor(data, device=...)`` of host data
  (a blocking copy from pageable memory synchronises the stream: ``"h2d copy"``), and ``.cpu()`` /
  ``.to("cpu")`` of device data (``"d2h copy"``).

Which tensors live on the device. On CPU every tensor does, so the trace tracks it: a tensor is a
*device tensor* when it is (or shares storage with) an ``nn.Parameter``, one of ``device_tensors``, a
buffer of one of ``modules``, the
result of an op with a device tensor among its inputs, the result of a host -> device move, or the
output of a factory given a device (``torch.zeros(..., device=d)``). A device argument counts as the
accelerator unless it is the literal string ``"cpu"``: a ``torch.device`` object cannot tell the
difference here, so ``layout.token_bounds(torch.device("cpu"))`` is counted as a move (conservative).
Host tensors (e.g. a prefix layout's compact tables, kept on the CPU by design) are read for free; those
reads are kept apart in :attr:`SyncTrace.host_reads`, not counted as synchronisations.

A no-op move on CPU (``x.to(device)`` where ``x`` is already there) returns a copy under the trace, so
that the moved tensor and the host original keep their own device flags; results are unchanged.

Each event names its *site*: the innermost frame of the stack inside ``pygpo/`` or ``kernels/``
(``file::function``, with the line in :attr:`SyncEvent.line`), and its *origin*: the innermost frame
outside torch (e.g. a line in ``transformers``). Events raised from inside triton (the interpreter's
own numpy work under ``TRITON_INTERPRET=1``) are ignored: only the torch work around the launches counts.
"""

from __future__ import annotations

import os
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Folders whose frames name a site (paths relative to the repository root).
SITE_ROOTS = ("pygpo", "kernels")
#: Helpers that perform a read or copy on their caller's behalf: the caller names the site.
PASS_THROUGH = frozenset({"pygpo/ops/validation.py::host_ints", "pygpo/ops/transfer.py::to_device"})

_aten = torch.ops.aten
#: Ops that read a value or size from the data (overload packets; all overloads count).
_VALUE_READS = {
    _aten._local_scalar_dense: "aten._local_scalar_dense",
    _aten.is_nonzero: "aten.is_nonzero",
    _aten.equal: "aten.equal",
    _aten.nonzero: "aten.nonzero",
    _aten.masked_select: "aten.masked_select",
    _aten._unique: "aten._unique",
    _aten._unique2: "aten._unique2",
    _aten.unique_dim: "aten.unique_dim",
    _aten.unique_consecutive: "aten.unique_consecutive",
    _aten.unique_dim_consecutive: "aten.unique_dim_consecutive",
    _aten.bincount: "aten.bincount",
}
_INDEXING = {_aten.index: "aten.index (bool mask)", _aten.index_put: "aten.index_put (bool mask)",
             _aten.index_put_: "aten.index_put_ (bool mask)", _aten._index_put_impl_: "aten._index_put_impl_ (bool mask)"}
#: Python-level reads of a whole tensor (no aten op on CPU).
_HOST_READS = {"tolist", "numpy", "__array__"}
_MOVES = {"to", "cpu", "cuda"}
#: Factories that take ``data`` from host memory: with a device, a host -> device copy.
_FROM_DATA = {"tensor", "as_tensor", "asarray"}


@dataclass(frozen=True)
class SyncEvent:
    """One op that would synchronise host and device."""

    op: str
    site: str  # "pygpo/ops/validation.py::check_label_range", or "<outside pygpo>"
    line: int  # line of the site frame (0 when outside pygpo)
    origin: str  # innermost frame outside torch, "path:line"
    stack: tuple[str, ...] = field(default=(), compare=False)  # the project's frames, innermost last

    def where(self) -> str:
        return f"{self.site}:{self.line}" if self.line else f"{self.site} ({self.origin})"


def _relative(path: str) -> str:
    path = os.path.abspath(path)
    return os.path.relpath(path, _REPO) if path.startswith(_REPO + os.sep) else path


def _in_roots(rel: str) -> bool:
    return any(rel.startswith(root + os.sep) for root in SITE_ROOTS)


def _is_torch_frame(path: str) -> bool:
    parts = path.replace("\\", "/").split("/")
    return "torch" in parts and "site-packages" in parts or path.endswith("sync_trace.py")


def _is_triton_frame(path: str) -> bool:
    parts = path.replace("\\", "/").split("/")
    return "triton" in parts and "site-packages" in parts


class _Taint:
    """Storages of the tensors that would live on the device (weak references: storages can be freed)."""

    def __init__(self) -> None:
        self._refs: dict[int, StorageWeakRef] = {}

    @staticmethod
    def _key(t: torch.Tensor) -> Optional[int]:
        try:
            return t.untyped_storage()._cdata
        except (RuntimeError, NotImplementedError):  # tensors without a storage
            return None

    def add(self, t: torch.Tensor) -> None:
        key = self._key(t)
        if key is not None and key not in self._refs:
            self._refs[key] = StorageWeakRef(t.untyped_storage())

    def discard(self, t: torch.Tensor) -> None:
        key = self._key(t)
        if key is not None:
            self._refs.pop(key, None)

    def has(self, t: torch.Tensor) -> bool:
        if isinstance(t, nn.Parameter):
            self.add(t)
            return True
        key = self._key(t)
        ref = self._refs.get(key) if key is not None else None
        if ref is not None and ref.expired():  # the storage was freed and its address reused
            del self._refs[key]
            return False
        return ref is not None


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


class _Recorder:
    """Base of the two modes: both report to one :class:`SyncTrace`."""

    def __init__(self, trace: "SyncTrace") -> None:
        super().__init__()
        self.trace = trace


class _DispatchRecorder(_Recorder, TorchDispatchMode):
    """aten-level events: value reads, data-dependent shapes; propagates the device flag to outputs."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        trace = self.trace
        inputs = _tensors((args, kwargs))
        on_device = any(trace.taint.has(t) for t in inputs)
        name = self._sync_name(func, args, kwargs)
        if name is not None:
            trace.record(name, device=on_device)
        if on_device:
            for t in _tensors(out):
                trace.taint.add(t)
        return out

    @staticmethod
    def _sync_name(func, args, kwargs) -> Optional[str]:
        packet = func.overloadpacket
        if packet in _VALUE_READS:
            return _VALUE_READS[packet]
        if packet in _INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
                return _INDEXING[packet]
            return None
        if func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            return "aten.repeat_interleave (no output_size)"
        return None


def _destination(args: tuple, kwargs: dict, trace: "SyncTrace") -> Optional[str]:
    """``"host"``, ``"device"`` or ``None`` (no device given) for the arguments of ``Tensor.to``."""
    candidates = list(args) + [kwargs.get("device"), kwargs.get("other")]
    for a in candidates:
        if isinstance(a, str):
            return "host" if a.split(":")[0] == "cpu" else "device"
        if isinstance(a, torch.device):
            return trace.device_kind(a)
        if isinstance(a, int) and not isinstance(a, bool):
            return "device"
        if isinstance(a, torch.Tensor):
            return "device" if trace.taint.has(a) else "host"
    return None


class _FunctionRecorder(_Recorder, TorchFunctionMode):
    """Python-level events: whole-tensor reads, moves between host and device, factories with a device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        trace = self.trace
        name = getattr(func, "__name__", "")
        out = func(*args, **kwargs)
        self_t = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name == "__get__" and isinstance(out, torch.device) and self_t is not None:  # Tensor.device
            trace.remember_device(out, on_device=trace.taint.has(self_t))
        elif name in _HOST_READS and self_t is not None:
            trace.record(f"Tensor.{name}", device=trace.taint.has(self_t))
        elif name in _MOVES and self_t is not None:
            out = self._move(name, self_t, args[1:], kwargs, out)
        elif name in _FROM_DATA or "device" in kwargs:
            dest = _destination((), {"device": kwargs.get("device")}, trace)
            if dest == "device":
                data = args[0] if args else kwargs.get("data")
                if name in _FROM_DATA and not (isinstance(data, torch.Tensor) and trace.taint.has(data)):
                    trace.record(f"h2d copy (torch.{name})", device=True)
                for t in _tensors(out):
                    trace.taint.add(t)
        return out

    def _move(self, name: str, src: torch.Tensor, args: tuple, kwargs: dict, out: Any) -> Any:
        trace = self.trace
        dest = {"cpu": "host", "cuda": "device"}.get(name) or _destination(args, kwargs, trace)
        on_device = trace.taint.has(src)
        if dest is None or (dest == "device") == on_device:
            return out
        if name == "to":
            non_blocking = torch._C._nn._parse_to(*args, **kwargs)[2]
        else:
            non_blocking = bool(kwargs.get("non_blocking", False))
        if dest == "device" and non_blocking:  # queued behind the stream's work (from pinned memory on a GPU)
            trace.record("h2d copy (non_blocking)", device=False, queued=True)
        else:
            trace.record("h2d copy" if dest == "device" else "d2h copy", device=True)
        if isinstance(out, torch.Tensor) and out.untyped_storage()._cdata == src.untyped_storage()._cdata:
            with torch._C.DisableTorchFunction():
                out = out.clone()  # a no-op move on CPU: give the moved tensor its own storage and flag
        if dest == "device":
            trace.taint.add(out)
        else:
            trace.taint.discard(out)
        return out


class SyncTrace:
    """Context manager recording the synchronisations of the code it wraps (see the module docstring).

    Attributes:
        events: the device synchronisations, in order.
        host_reads: reads of host tensors (free on a GPU machine too), for information.
        queued_copies: host -> device copies with ``non_blocking=True`` (no host wait), for information.
    """

    def __init__(self, *, device_tensors: Iterable[torch.Tensor] = (), modules: Iterable[nn.Module] = ()) -> None:
        self.taint = _Taint()
        for t in device_tensors:
            self.taint.add(t)
        for module in modules:  # parameters are recognised on sight; buffers (e.g. rotary tables) are not
            for t in module.buffers():
                self.taint.add(t)
        self.events: list[SyncEvent] = []
        self.host_reads: list[SyncEvent] = []
        self.queued_copies: list[SyncEvent] = []
        self._devices: dict[int, tuple[torch.device, str]] = {}
        self._modes: list[Any] = []

    def remember_device(self, device: torch.device, *, on_device: bool) -> None:
        """Note where a ``torch.device`` object read from a tensor's ``.device`` points (kept alive, so its
        id stays unique)."""
        self._devices[id(device)] = (device, "device" if on_device else "host")

    def device_kind(self, device: torch.device) -> str:
        """``"host"`` for a device object read from a host tensor, else ``"device"`` (conservative)."""
        known = self._devices.get(id(device))
        return known[1] if known is not None and known[0] is device else "device"

    def mark_device(self, *tensors: torch.Tensor) -> None:
        """Declare ``tensors`` device tensors (e.g. a batch that the caller moved to the GPU beforehand)."""
        for t in tensors:
            self.taint.add(t)

    def record(self, op: str, *, device: bool, queued: bool = False) -> None:
        frames = traceback.extract_stack()[:-2]
        if any(_is_triton_frame(f.filename) for f in frames):
            return
        site, line, origin = "<outside pygpo>", 0, "?"
        ours = []
        for f in frames:
            rel = _relative(f.filename)
            if _in_roots(rel):
                ours.append(f"{rel}:{f.lineno} ({f.name})")
        for f in reversed(frames):
            rel = _relative(f.filename)
            if origin == "?" and not _is_torch_frame(f.filename):
                origin = f"{rel}:{f.lineno}"
            if _in_roots(rel) and f"{rel}::{f.name}" not in PASS_THROUGH:
                site, line = f"{rel}::{f.name}", f.lineno
                break
        event = SyncEvent(op, site, line, origin, tuple(ours[-6:]))
        (self.queued_copies if queued else self.events if device else self.host_reads).append(event)

    def __enter__(self) -> "SyncTrace":
        self._modes = [_FunctionRecorder(self), _DispatchRecorder(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []

    def sites(self) -> Counter:
        """``Counter`` of site -> number of synchronisations there."""
        return Counter(e.site for e in self.events)

    def report(self) -> str:
        """One line per distinct ``(op, site:line)``, with its count and origin."""
        counts = Counter((e.op, e.where(), e.origin) for e in self.events)
        lines = [f"{n:4d}x {op:42s} {where}   [{origin}]" for (op, where, origin), n in counts.items()]
        return "\n".join(lines) if lines else "(no synchronisations)"


def trace_syncs(fn: Callable[..., Any], *args: Any, device_tensors: Iterable[torch.Tensor] = (),
                modules: Iterable[nn.Module] = (), **kwargs: Any) -> tuple[Any, SyncTrace]:
    """``fn(*args, **kwargs)`` under a :class:`SyncTrace`; returns ``(result, trace)``."""
    with SyncTrace(device_tensors=device_tensors, modules=modules) as trace:
        result = fn(*args, **kwargs)
    return result, trace

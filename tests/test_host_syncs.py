"""Host <-> device synchronisations of the hot paths, counted on CPU with :mod:`sync_trace`.

Each test lists the exact call sites allowed to synchronise (``file::function`` and the op), so that a
new sync anywhere fails with its location. Values are checked against float64 references too, so the
traced runs are the real computations.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

import pygpo
from pygpo.ops.transfer import to_device
from pygpo.prefix import pack
from sync_trace import SyncTrace

LABEL_CHECK = ("Tensor.tolist", "pygpo/ops/validation.py::check_label_range")
LAYOUT_READ = ("Tensor.tolist", "pygpo/fused/layout.py::_build")
FINITE_CHECK = ("aten._local_scalar_dense", "pygpo/losses/validation.py::check_finite")


def _ops(trace: SyncTrace) -> Counter:
    return Counter((e.op, e.site) for e in trace.events)


def _assert_syncs(trace: SyncTrace, allowed: list[tuple[str, str]]) -> None:
    assert _ops(trace) == Counter(allowed), f"synchronisations:\n{trace.report()}"


# ------------------------------------------------------------------------------------------ the tool


def test_trace_records_device_reads_and_ignores_host_ones():
    dev = torch.arange(6.0)
    host = torch.arange(6)
    with SyncTrace(device_tensors=[dev]) as trace:
        x = dev * 2  # derived from a device tensor: on the device too
        float(x.sum())
        x[x > 3].sum()
        (x > 1).nonzero()
        x.tolist()
        int(host.max())  # a host tensor: free
        host.to(x.device)  # host -> device, blocking
        host.to(x.device, non_blocking=True)
        x.to("cpu")  # device -> host
    assert [e.op for e in trace.events] == [
        "aten._local_scalar_dense", "aten.index (bool mask)", "aten.nonzero", "Tensor.tolist", "h2d copy",
        "d2h copy",
    ], trace.report()
    assert [e.op for e in trace.host_reads] == ["aten._local_scalar_dense"]
    assert [e.op for e in trace.queued_copies] == ["h2d copy (non_blocking)"]
    assert all(e.site == "<outside pygpo>" and e.origin.startswith("tests/test_host_syncs.py:") for e in trace.events)


def test_trace_names_the_pygpo_site():
    labels = torch.tensor([1, 2, 50])
    with SyncTrace(device_tensors=[labels]) as trace, pytest.raises(ValueError, match="found 50"):
        pygpo.ops.validation.check_label_range(labels, 10, ignore_index=-100)
    assert trace.events[0].site == LABEL_CHECK[1]
    assert trace.events[0].line > 0


# ------------------------------------------------------------------------------------------ the ops


def _rows(seed: int = 0, *, n: int = 8, t: int = 10, d: int = 12, v: int = 37):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, d, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (n, t), generator=g)
    labels[: n // 2] = -100  # half the rows ignored
    return hidden, weight, labels


def _reference_logprobs(hidden, weight, labels):
    logp = torch.log_softmax(hidden.detach().double() @ weight.detach().double().T, -1)
    out = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return torch.where(labels == -100, torch.zeros_like(out), out)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_linear_logprobs_syncs_once(backend):
    hidden, weight, labels = _rows()
    if backend == "triton":  # the interpreter's tl.dot is fp32
        hidden, weight = (x.detach().float().requires_grad_() for x in (hidden, weight))
    with SyncTrace(device_tensors=[hidden, weight, labels]) as trace:
        out = pygpo.fused_linear_logprobs(hidden, weight, labels, backend=backend, return_entropy=True)
        (out.logprobs.sum() + out.entropy.sum()).backward()
    _assert_syncs(trace, [LABEL_CHECK])  # the label check, which also counts the rows to compact
    torch.testing.assert_close(out.logprobs.double(), _reference_logprobs(hidden, weight, labels),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_linear_kl_syncs_once(backend):
    hidden, weight, labels = _rows(1)
    dtype = torch.float32 if backend == "triton" else torch.float64
    hidden, weight = (x.detach().to(dtype).requires_grad_() for x in (hidden, weight))
    ref_hidden, ref_weight = hidden.detach() * 0.5, weight.detach() + 0.1
    with SyncTrace(device_tensors=[hidden, weight, ref_hidden, ref_weight, labels]) as trace:
        out = pygpo.fused_linear_kl(hidden, weight, ref_hidden, ref_weight, labels, backend=backend)
        (out.logprobs.sum() + out.kl.sum()).backward()
    _assert_syncs(trace, [LABEL_CHECK])
    torch.testing.assert_close(out.ref_logprobs.double(), _reference_logprobs(ref_hidden, ref_weight, labels),
                               rtol=1e-5, atol=1e-5)


def test_labels_copied_from_the_host_are_checked_there():
    hidden, weight, labels = _rows(2)
    with SyncTrace(device_tensors=[hidden, weight]) as trace:
        on_device = to_device(labels, hidden.device)
        pygpo.fused_linear_logprobs(hidden, weight, on_device).sum().backward()
    _assert_syncs(trace, [])  # the range check read the host copy
    assert [e.op for e in trace.queued_copies] == ["h2d copy (non_blocking)"]

    # modified in place after the copy: the host copy is stale, so the device labels are read (and a bad
    # label there is found)
    with SyncTrace(device_tensors=[hidden, weight]) as trace:
        on_device = to_device(labels, hidden.device)
        on_device[-1, -1] = weight.shape[0]
        with pytest.raises(ValueError, match=f"found {weight.shape[0]}"):
            pygpo.fused_linear_logprobs(hidden, weight, on_device)
    assert trace.events[0].site == LABEL_CHECK[1]


@pytest.mark.parametrize("made_in_inference_mode", [False, True], ids=["host-tensor", "inference-tensor"])
def test_labels_copied_under_inference_mode(made_in_inference_mode):
    # inference tensors keep no version counter: the copy is not paired with its host labels (reading
    # `_version` would raise), so the device labels are checked, with the check's one sync
    hidden, weight, labels = _rows(3)
    hidden, weight = hidden.detach(), weight.detach()
    with torch.inference_mode():
        if made_in_inference_mode:
            labels = labels.clone()
        with SyncTrace(device_tensors=[hidden, weight]) as trace:
            on_device = to_device(labels, hidden.device)
            out = pygpo.fused_linear_logprobs(hidden, weight, on_device)
    _assert_syncs(trace, [LABEL_CHECK])
    torch.testing.assert_close(out.double(), _reference_logprobs(hidden, weight, labels), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ the fused loss


def _batch(vocab: int):
    rng = random.Random(0)
    tok = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    return pack([tok(5), tok(7), tok(3)], [[tok(4), tok(6)], [tok(3), tok(2)], [tok(5), tok(5)]], max_tokens=24)


def _batch_tensors(batch) -> list[torch.Tensor]:
    return [v for v in vars(batch).values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("form", ["rows", "prefix-host", "prefix-device", "rows-eager"])
@pytest.mark.parametrize("check_finite", [True, False])
def test_fused_preference_loss_reads_once(form, check_finite):
    hidden, weight, labels = _rows(3, n=6, t=9)
    labels[:, :2] = -100  # every row a response: a prompt of 2 ignored tokens
    labels[: hidden.shape[0] // 2] = torch.randint(0, weight.shape[0], (3, 9), generator=torch.Generator().manual_seed(4))
    labels[: hidden.shape[0] // 2, :2] = -100
    ref_hidden, ref_weight = hidden.detach() + 0.1, weight.detach() * 0.9
    loss = pygpo.FusedPreferenceLoss("dpo", beta=0.1, backend="torch", check_finite=check_finite,
                                     eager_gradients=form == "rows-eager")
    device = [hidden, weight, ref_hidden, ref_weight, labels]
    kwargs = dict(ref_hidden=ref_hidden, ref_weight=ref_weight)
    if form.startswith("prefix"):
        batch = _batch(weight.shape[0])
        n = batch.target_index.numel()
        hidden = hidden.detach().reshape(-1, hidden.shape[-1])[:n].clone().requires_grad_()
        kwargs = dict(batch=batch, ref_hidden=hidden.detach() + 0.1, ref_weight=ref_weight)
        device = [hidden, weight, ref_weight, kwargs["ref_hidden"]]
        if form == "prefix-device":  # as after batch.to(device)
            device += _batch_tensors(batch)
        labels = None
    with SyncTrace(device_tensors=device) as trace:
        out = loss(hidden, weight, labels, **kwargs)
        out.loss.backward()
    allowed = [LAYOUT_READ]  # sizes, empty responses and the label range, in one read
    if form == "rows-eager":
        allowed.append(("aten._local_scalar_dense", "pygpo/fused/eager.py::eager_loss"))  # separability check
    if check_finite:
        allowed.append(FINITE_CHECK)
    _assert_syncs(trace, allowed)
    assert torch.isfinite(out.loss)


def test_fused_preference_loss_values_unchanged_by_the_single_read():
    """The layout built from one device read scores the same tokens as a float64 loop over the rows."""
    hidden, weight, labels = _rows(5, n=4, t=7)
    labels[:, :2] = -100
    labels[:2] = torch.randint(0, weight.shape[0], (2, 7), generator=torch.Generator().manual_seed(6))
    labels[:2, :3] = -100
    ref_hidden, ref_weight = hidden.detach() + 0.1, weight.detach() * 0.9
    out = pygpo.FusedPreferenceLoss("dpo", beta=0.1, backend="torch")(hidden, weight, labels, ref_hidden=ref_hidden,
                                                                     ref_weight=ref_weight)
    tok = _reference_logprobs(hidden, weight, labels).sum(-1)
    ref = _reference_logprobs(ref_hidden, ref_weight, labels).sum(-1)
    b = hidden.shape[0] // 2  # rank-major rows: chosen rows, then rejected rows
    margin = (tok[:b] - ref[:b]) - (tok[b:] - ref[b:])
    expected = -torch.nn.functional.logsigmoid(0.1 * margin).mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-7, atol=1e-9)
    assert out.lengths.tolist() == [[4, 5], [4, 5]]  # (B, K): chosen rows hold 4 tokens, rejected 5


# ------------------------------------------------------------------------------------------ the shared step


def _llama(layers: int, backend: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from pygpo.integrations.transformers import enable_prefix_sharing

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return enable_prefix_sharing(LlamaForCausalLM(cfg), backend=backend)


def _sink_model(backend: str):
    """Granite SWA (dense): a sliding window of 3 positions on its first layer, learned sinks on both."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from pygpo.integrations.transformers import enable_prefix_sharing

    if "granite_swa" not in CONFIG_MAPPING:
        pytest.skip("this transformers has no Granite SWA")
    import transformers

    cfg = CONFIG_MAPPING["granite_swa"](vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        sliding_window=3, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["granite_swa"])(cfg)
    return enable_prefix_sharing(model, backend=backend)


def _shared_step_trace(model) -> SyncTrace:
    from pygpo.integrations.transformers import response_logprobs

    with SyncTrace(modules=[model]) as trace:
        batch = _batch(64)
        logps = response_logprobs(model, batch)
        (logps * 1e-3).sum().backward()
    assert torch.isfinite(logps).all()
    return trace


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shared_step_has_no_host_syncs(backend):
    """pack -> response_logprobs -> backward: the batch's index tensors are queued to the device before the
    forward, the labels checked on their host copy, the block maps built without reading sizes back."""
    for layers in (1, 3 if backend == "torch" else 2):
        trace = _shared_step_trace(_llama(layers, backend))
        assert not _ops(trace), f"{layers} layer(s):\n{trace.report()}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shared_step_with_window_and_sinks_has_no_host_syncs(backend):
    """The same with a sliding window shorter than the packed sequences (bounds and block maps narrowed on
    the host) and learned attention sinks (their gradient reduced on the device)."""
    model = _sink_model(backend)
    trace = _shared_step_trace(model)
    assert not _ops(trace), trace.report()
    sinks = [p for name, p in model.named_parameters() if name.endswith("sinks")]
    assert len(sinks) == 2 and all(bool(p.grad.abs().max() > 0) for p in sinks)  # the sinks took part

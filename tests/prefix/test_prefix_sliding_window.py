"""Sliding-window attention under enable_prefix_sharing: a forward without ``prefix_layout`` keeps the
model's own sliding window (the reference is an unpatched copy of the model with transformers' SDPA
attention), and a layout longer than the window keeps it, counted in each response's positions."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pygpo.integrations.transformers import enable_prefix_sharing, response_logprobs  # noqa: E402
from pygpo.prefix import pack  # noqa: E402
from prefix_reference import single_torch_thread  # noqa: F401, E402

VOCAB = 53
WINDOW = 4


def _model(arch: str, window=WINDOW):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, sliding_window=window, attn_implementation="sdpa")
    if arch == "mistral":
        cfg, cls = transformers.MistralConfig(**common), transformers.MistralForCausalLM
    else:  # every layer a sliding one
        cfg = transformers.Qwen2Config(use_sliding_window=window is not None, max_window_layers=0, **common)
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    return cls(cfg).float().eval()


def _padding(kind: str, ids: torch.Tensor):
    if kind == "none":
        return None
    mask = torch.ones_like(ids)
    if kind == "right":
        mask[1, -3:] = 0
    else:
        mask[1, :3] = 0
    return mask


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_forward_without_layout_keeps_the_sliding_window(arch, padding):
    model = _model(arch)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = _padding(padding, ids)
    kwargs = {} if mask is None else {"attention_mask": mask}
    with torch.no_grad():
        want = model(input_ids=ids, **kwargs).logits
        patched = enable_prefix_sharing(copy.deepcopy(model))
        got = patched(input_ids=ids, **kwargs).logits
        full = _model(arch, window=None)(input_ids=ids, **kwargs).logits  # same weights, no window
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-6, atol=1e-6)
    # the window matters in this setup: full causal attention gives other logits
    assert (full[real] - want[real]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_layout_longer_than_the_window_keeps_the_window(arch):
    """A packed row longer than the window: every response sees what its own ``prompt + response``
    forward of the unpatched model sees (its window reaching back into the prompt by position)."""
    ref = _model(arch)
    model = enable_prefix_sharing(copy.deepcopy(ref), backend="torch")
    prompts, responses = [[5, 6, 7, 1], [2, 3]], [[[8, 9, 10, 4, 4], [11]], [[12, 13], [14, 15, 16, 17]]]
    batch = pack(prompts, responses, max_tokens=64)
    assert batch.input_ids.shape[0] == 1 and batch.input_ids.shape[1] > 2 * WINDOW
    shared = response_logprobs(model, batch)
    want = []
    for e, k in zip(batch.response_example.tolist(), batch.response_rank.tolist()):
        p, y = prompts[e], responses[e][k]
        logp = torch.log_softmax(ref(input_ids=torch.tensor([p + y])).logits[0, len(p) - 1:-1].float(), -1)
        want.append(logp.gather(-1, torch.tensor(y)[:, None]).sum())
    torch.testing.assert_close(shared, torch.stack(want), rtol=1e-5, atol=1e-6)

"""The key test: one shared forward gives each response the log-probs (and parameter gradients) of a
separate ``prompt + response`` forward of the same model (acceptance item 4), for real transformers
architectures built from small configs with random weights.

The reference is an untouched copy of the model running transformers' own eager attention, one
unpadded sequence at a time, with log-probs taken from its full logits.
"""

from __future__ import annotations

import copy
import random
import zlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pygpo.integrations.transformers import (  # noqa: E402
    disable_prefix_sharing,
    enable_prefix_sharing,
    response_logprobs,
)
from pygpo.prefix import pack  # noqa: E402
from prefix_reference import single_torch_thread  # noqa: F401, E402

VOCAB = 67
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    if arch == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    elif arch == "mistral":
        cfg, cls = transformers.MistralConfig(sliding_window=64, **common), transformers.MistralForCausalLM
    elif arch == "gemma":
        cfg, cls = transformers.GemmaConfig(head_dim=8, **common), transformers.GemmaForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(0)
    return cls(cfg).to(DEVICE).float()


def _data(seed: int, n: int, k: int | None):
    """``n`` prompts; K=2 (``k=2``) or K varying 2..4 (``k=None``); some responses of length 1."""
    rng = random.Random(seed)
    tok = lambda m: [rng.randrange(VOCAB) for _ in range(m)]  # noqa: E731
    prompts = [tok(rng.randint(1, 7)) for _ in range(n)]
    responses = []
    for i in range(n):
        kk = k if k is not None else (4 if i % 2 == 0 else rng.randint(2, 3))
        responses.append([tok(1 if j == kk - 1 and i % 2 == 0 else rng.randint(1, 6)) for j in range(kk)])
    return prompts, responses


def _separate_logprobs(model, prompts, responses, order):
    """Per response (in ``order`` = [(example, rank)]), sum of log p(y_t | prompt, y_<t) from its own forward."""
    out = []
    for e, k in order:
        p, y = prompts[e], responses[e][k]
        ids = torch.tensor([p + y], device=DEVICE)
        logits = model(input_ids=ids).logits[0].float()
        logp = torch.log_softmax(logits[len(p) - 1:-1], dim=-1)
        out.append(logp.gather(-1, torch.tensor(y, device=DEVICE)[:, None]).sum())
    return torch.stack(out)


def _assert_equivalent(shared_model, ref_model, batch, prompts, responses):
    order = list(zip(batch.response_example.tolist(), batch.response_rank.tolist()))
    shared = response_logprobs(shared_model, batch)
    ref = _separate_logprobs(ref_model, prompts, responses, order)
    torch.testing.assert_close(shared, ref, rtol=1e-5, atol=0)
    # Gradients of an arbitrary weighted sum (like a DPO loss) w.r.t. every parameter.
    w = torch.linspace(-1.0, 1.5, len(order), device=DEVICE)
    (shared * w).sum().backward()
    (ref * w).sum().backward()
    for (name, p_s), (_, p_r) in zip(shared_model.named_parameters(), ref_model.named_parameters()):
        g_s, g_r = p_s.grad, p_r.grad
        assert g_r is not None and g_s is not None, name
        scale = float(g_r.abs().max())
        torch.testing.assert_close(g_s, g_r, rtol=1e-5, atol=1e-5 * scale, msg=name)
        assert float((g_s - g_r).norm() / g_r.norm()) < 1e-5, name


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma"])
@pytest.mark.parametrize("k", [2, None], ids=["K2", "K2to4"])
@pytest.mark.parametrize("max_tokens", [None, 32], ids=["rows", "packed"])
def test_shared_forward_equals_separate_forwards(arch, k, max_tokens):
    ref = _model(arch)
    shared = enable_prefix_sharing(copy.deepcopy(ref), backend="torch")
    prompts, responses = _data(zlib.crc32(f"{arch}-{k}".encode()) % 1000, 5, k)  # hash() of a str varies per process
    batch = pack(prompts, responses, max_tokens=max_tokens)
    if max_tokens is not None:
        assert batch.input_ids.shape[0] < 5
    if k is None:
        assert 4 in batch.responses_per_example.tolist()
    assert 1 in batch.response_lengths.tolist()
    _assert_equivalent(shared, ref, batch, prompts, responses)


@pytest.mark.parametrize("k, max_tokens", [(2, None), (None, 48)], ids=["K2-rows", "K2to4-packed"])
def test_triton_attention_inside_model(k, max_tokens):
    """The Triton kernels (interpreted on CPU) pass the same equivalence, at small sizes."""
    ref = _model("llama")
    shared = enable_prefix_sharing(copy.deepcopy(ref), backend="triton")
    prompts, responses = _data(7, 3, k)
    batch = pack(prompts, responses, max_tokens=max_tokens)
    _assert_equivalent(shared, ref, batch, prompts, responses)


def test_full_model_forward_accepts_layout_and_fills_positions():
    ref = _model("qwen2")
    shared = enable_prefix_sharing(copy.deepcopy(ref), backend="torch")
    prompts, responses = _data(3, 3, 2)
    batch = pack(prompts, responses, max_tokens=30)
    logits = shared(input_ids=batch.input_ids.to(DEVICE), prefix_layout=batch).logits  # a PrefixBatch works too
    rows = logits.reshape(-1, VOCAB)[batch.target_index.to(DEVICE)]
    token = torch.log_softmax(rows.float(), -1).gather(-1, batch.target_labels.to(DEVICE)[:, None])[:, 0]
    order = list(zip(batch.response_example.tolist(), batch.response_rank.tolist()))
    torch.testing.assert_close(batch.response_sums(token), _separate_logprobs(ref, prompts, responses, order),
                               rtol=1e-5, atol=0)


def test_without_layout_behaves_like_stock_model_with_padding():
    ref = _model("llama")
    shared = enable_prefix_sharing(copy.deepcopy(ref), backend="torch")
    ids = torch.randint(0, VOCAB, (2, 9), device=DEVICE)
    mask = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    mask[1, :3] = 0  # left padding
    got = shared(input_ids=ids, attention_mask=mask).logits
    want = ref(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, 3:], want[1, 3:], rtol=1e-5, atol=1e-5)
    disable_prefix_sharing(shared)
    assert shared.config._attn_implementation == "eager"


def test_integration_errors():
    model = enable_prefix_sharing(_model("llama"), backend="torch")
    batch = pack([[1, 2, 3]], [[[4, 5], [6]]])
    ids = batch.input_ids.to(DEVICE)
    with pytest.raises(ValueError, match="position_ids do not match prefix_layout"):
        model(input_ids=ids, prefix_layout=batch.layout, position_ids=torch.arange(6, device=DEVICE)[None])
    with pytest.raises(ValueError, match="carries its own mask"):
        mask = torch.ones_like(ids)
        mask[0, 0] = 0
        model(input_ids=ids, prefix_layout=batch.layout, attention_mask=mask)
    with pytest.raises(ValueError, match="layout does not match input_ids"):
        model(input_ids=torch.cat([ids, ids]), prefix_layout=batch.layout)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        enable_prefix_sharing(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="enable_prefix_sharing"):
        response_logprobs(_model("llama"), batch)

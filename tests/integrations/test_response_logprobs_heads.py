"""response_logprobs applies the model's own logit transforms (Cohere's logit_scale, Granite's
logits_scaling, Gemma-2's final softcap) and works through a DataParallel wrapper. The reference is a
plain float64 forward of each ``prompt + response`` alone, log-probs from its ``.logits``."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pygpo.integrations.transformers import enable_prefix_sharing, response_logprobs  # noqa: E402
from pygpo.prefix import pack  # noqa: E402

VOCAB = 61
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, attn_implementation="sdpa")
PROMPTS = [[5, 9, 14, 3], [7, 22], [40, 41, 42, 43, 44]]
RESPONSES = [[[11, 12], [13, 50, 51]], [[8], [30, 31, 32, 33]], [[2, 3, 4], [6]]]


def _model(arch: str):
    if arch == "cohere":
        cfg, cls = transformers.CohereConfig(logit_scale=0.5, **COMMON), transformers.CohereForCausalLM
    elif arch == "granite":
        cfg, cls = transformers.GraniteConfig(logits_scaling=4.0, **COMMON), transformers.GraniteForCausalLM
    else:
        cfg = transformers.Gemma2Config(head_dim=8, attn_logit_softcapping=None, final_logit_softcapping=3.0,
                                        query_pre_attn_scalar=8, **{**COMMON, "attn_implementation": "eager"})
        cls = transformers.Gemma2ForCausalLM
    torch.manual_seed(0)
    return cls(cfg).double().eval()


def _separate(model, temperature: float = 1.0) -> torch.Tensor:
    out = []
    for p, rs in zip(PROMPTS, RESPONSES):
        for y in rs:
            ids = torch.tensor([p + y])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1:-1] / temperature, dim=-1)
            out.append(logp.gather(-1, torch.tensor(y)[:, None]).sum())
    return torch.stack(out)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("arch", ["cohere", "granite", "gemma2"])
def test_logit_transforms_match_a_plain_forward(arch, temperature):
    model = _model(arch)
    with torch.no_grad():
        want = _separate(model, temperature)
        batch = pack(PROMPTS, RESPONSES)
        got = response_logprobs(enable_prefix_sharing(model, backend="torch"), batch, temperature=temperature)
    # pack keeps the examples' order and each example's responses in order
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_data_parallel_wrapper():
    model = enable_prefix_sharing(_model("cohere"), backend="torch")
    wrapped = torch.nn.DataParallel(model)
    batch = pack(PROMPTS, RESPONSES)
    got = response_logprobs(wrapped, batch)
    with torch.no_grad():
        want = _separate(model)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    got.sum().backward()  # gradients reach the wrapped model's parameters
    assert model.lm_head.weight.grad is not None and model.model.embed_tokens.weight.grad is not None


def test_bad_input_is_named():
    model = _model("granite")
    batch = pack(PROMPTS, RESPONSES)
    with pytest.raises(ValueError, match="enable_prefix_sharing"):
        response_logprobs(torch.nn.DataParallel(model), batch)
    with pytest.raises(TypeError, match="batch must be a PrefixBatch"):
        response_logprobs(enable_prefix_sharing(model), batch.input_ids)

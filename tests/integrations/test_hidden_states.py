"""final_hidden_states / lm_head_of against plain ``model(...).logits`` of real float64 transformers models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from pygpo.integrations.hidden_states import (  # noqa: E402
    LMHead,
    decoder_body,
    final_hidden_states,
    lm_head_of,
    unwrap_model,
)
from tiny_models import random_ids, reference_token_logps, tiny_causal_lm  # noqa: E402

# (arch, tied): tied and untied heads, softcapping (gemma2/3), logit scales (cohere, granite), a bias (phi).
CASES = [
    ("llama", False), ("llama", True), ("qwen2", False), ("mistral", False), ("gemma", True),
    ("gemma2", False), ("gemma3", True), ("cohere", True), ("granite", False), ("phi", False),
]


def _batch():
    ids = random_ids(3, 10, seed=5)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # right padding
    mask[2, -1:] = 0
    return ids, mask


@pytest.fixture
def no_lm_head_forward():
    """Registers a forward hook on a model's lm_head that fails the test if the lm_head ever runs."""
    handles = []

    def arm(model):
        def fail(*_):
            raise AssertionError("the lm_head forward ran")

        handles.append(unwrap_model(model).get_output_embeddings().register_forward_hook(fail))
        return model

    yield arm
    for h in handles:
        h.remove()


@pytest.mark.parametrize("arch,tied", CASES)
def test_token_logprobs_equal_logits_log_softmax(arch, tied, no_lm_head_forward):
    model = tiny_causal_lm(arch, tied=tied)
    ids, mask = _batch()
    expected = reference_token_logps(model, ids, mask)
    no_lm_head_forward(model)
    hidden = final_hidden_states(model, ids, attention_mask=mask)
    head = lm_head_of(model)
    got = head.logprobs(hidden[:, :-1], ids[:, 1:])
    assert hidden.shape == (3, 10, 32)
    valid = mask[:, :-1].bool()  # padded query rows are not compared
    torch.testing.assert_close(got.double()[valid], expected[valid], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("phi", False)])
def test_head_weight_is_the_models_parameter(arch, tied):
    model = tiny_causal_lm(arch, tied=tied)
    head = lm_head_of(model)
    assert head.weight is model.lm_head.weight
    assert (head.weight is model.get_input_embeddings().weight) == tied
    assert (head.bias is model.lm_head.bias) and ((head.bias is not None) == (arch == "phi"))


def test_softcap_and_scale_are_read_from_the_config():
    assert lm_head_of(tiny_causal_lm("gemma2")).softcap == 3.0
    assert lm_head_of(tiny_causal_lm("gemma3")).softcap == 2.5
    assert lm_head_of(tiny_causal_lm("llama")).softcap is None
    default = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, head_dim=8))
    assert lm_head_of(default).softcap == default.config.final_logit_softcapping == 30.0
    assert lm_head_of(tiny_causal_lm("cohere")).logit_scale == 0.5
    assert lm_head_of(tiny_causal_lm("granite")).logit_scale == 0.25
    assert lm_head_of(tiny_causal_lm("llama")).logit_scale == 1.0


def test_gradients_equal_those_through_the_logits():
    """Gemma-2 (tied, softcapped): gradients w.r.t. every parameter match the plain logits path."""
    ids, mask = _batch()
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    weights = torch.linspace(0.5, 1.5, labels.numel(), dtype=torch.float64).view(labels.shape)

    ref_model = tiny_causal_lm("gemma2", tied=True)
    logits = ref_model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    (logp * weights * (labels != -100)).sum().backward()

    model = tiny_causal_lm("gemma2", tied=True)
    hidden = final_hidden_states(model, ids, attention_mask=mask)
    (lm_head_of(model).logprobs(hidden[:, :-1], labels) * weights).sum().backward()
    ref = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-9, atol=1e-12, msg=name)


def test_lm_head_logprobs_with_softcap_and_scale():
    """Both transforms at once (no tiny model has them): softcap(scale * (h W^T + b)) / T, in float64."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 6, dtype=torch.float64, generator=g)
    w = torch.randn(11, 6, dtype=torch.float64, generator=g)
    b = torch.randn(11, dtype=torch.float64, generator=g)
    labels = torch.tensor([0, 3, -100, 10, 5, 5, 1])
    head = LMHead(weight=w, bias=b, softcap=2.0, logit_scale=0.7)
    got = head.logprobs(h, labels, temperature=1.3)
    z = 2.0 * torch.tanh(0.7 * (h @ w.T + b) / 2.0) / 1.3
    expected = torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0] * (labels != -100)
    torch.testing.assert_close(got.double(), expected, rtol=1e-12, atol=1e-12)
    scale_only = LMHead(weight=w, bias=None, softcap=None, logit_scale=0.7).logprobs(h, labels, temperature=1.3)
    expected = torch.log_softmax(0.7 * (h @ w.T) / 1.3, -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
    torch.testing.assert_close(scale_only.double(), expected * (labels != -100), rtol=1e-12, atol=1e-12)


def test_wrappers_are_unwrapped():
    model = tiny_causal_lm("llama")
    ids, mask = _batch()
    expected = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    wrapped = nn.DataParallel(model)  # on CPU: runs .module directly
    assert unwrap_model(wrapped) is model and decoder_body(wrapped) is model.model
    torch.testing.assert_close(final_hidden_states(wrapped, ids, attention_mask=mask), expected, rtol=0, atol=0)
    assert lm_head_of(wrapped).weight is model.lm_head.weight
    assert "forward" not in model.__dict__  # the temporary forward is removed again
    out = model(input_ids=ids, attention_mask=mask)  # the model still computes logits afterwards
    assert out.logits.shape == (3, 10, 128)


def test_forward_kwargs_pass_through_prefix_sharing(no_lm_head_forward):
    """prefix_layout travels to the attention: packed response log-probs equal separate forwards."""
    from pygpo.integrations.transformers import disable_prefix_sharing, enable_prefix_sharing
    from pygpo.prefix import pack

    model = tiny_causal_lm("qwen2")
    prompts = [[5, 6, 7], [9, 10]]
    responses = [[[1, 2, 3], [4, 4]], [[8], [11, 12, 13, 14]]]
    expected = []
    for p, rs in zip(prompts, responses):
        for r in rs:
            seq = torch.tensor([p + r])
            expected.append(float(reference_token_logps(model, seq)[0, len(p) - 1:].sum()))
    enable_prefix_sharing(model, backend="torch")
    try:
        batch = pack(prompts, responses)
        no_lm_head_forward(model)
        hidden = final_hidden_states(model, batch.input_ids, prefix_layout=batch.layout)
        token = lm_head_of(model).logprobs(batch.gather(hidden), batch.target_labels)
        got = batch.response_sums(token)
    finally:
        disable_prefix_sharing(model)
    # the packed path attends with SDPA, the reference with eager attention: they differ by ~1e-9 relative
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-7, atol=1e-7)


def test_bad_input():
    model = tiny_causal_lm("llama")
    ids, _ = _batch()
    with pytest.raises(TypeError, match="'labels'"):
        final_hidden_states(model, ids, labels=ids)
    with pytest.raises(TypeError, match="logits_to_keep"):
        final_hidden_states(model, ids, logits_to_keep=1)
    with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
        final_hidden_states(model)
    with pytest.raises(TypeError, match="decoder body"):
        final_hidden_states(nn.Linear(4, 4), ids)
    model.lm_head = nn.Sequential(model.lm_head)  # e.g. an adapter wrapping the head
    with pytest.raises(TypeError, match="not a plain nn.Linear"):
        lm_head_of(model)


def test_unknown_logit_transform_is_refused():
    """A logits_scaling on an architecture whose forward does not use it in a known way is not guessed."""
    config = transformers.LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, logits_scaling=2.0)
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(ValueError, match="logits_scaling=2.0"):
        lm_head_of(model)


def test_hyperclovax_logit_scale_multiplies():
    """HyperCLOVA X multiplies its logits by logits_scaling (Granite divides by it)."""
    if not hasattr(transformers, "HyperCLOVAXForCausalLM"):
        pytest.skip("this transformers has no HyperCLOVA X")
    config = transformers.HyperCLOVAXConfig(
        vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, logits_scaling=2.0)
    torch.manual_seed(0)
    model = transformers.HyperCLOVAXForCausalLM(config).double().eval()
    ids = torch.tensor([[1, 5, 7, 3]])
    head = lm_head_of(model)
    hidden = final_hidden_states(model, ids)
    logits = (hidden @ head.weight.T) * head.logit_scale
    torch.testing.assert_close(logits, model(input_ids=ids).logits, rtol=1e-12, atol=1e-12)
    assert head.logit_scale == 2.0


def test_prefix_layout_without_prefix_sharing_is_refused():
    """A layout passed to a model whose attention ignores it would let responses see each other."""
    import pygpo.prefix

    model = tiny_causal_lm("llama")
    batch = pygpo.prefix.pack([[1, 2, 3]], [[[4, 5], [6]]])
    with pytest.raises(ValueError, match="enable_prefix_sharing"):
        final_hidden_states(model, input_ids=batch.input_ids, prefix_layout=batch.layout)


def test_logits_from_another_stream_are_refused():
    """ProphetNet's logits read its first n-gram predicting stream, not the body's last_hidden_state."""
    if not hasattr(transformers, "ProphetNetForCausalLM"):
        pytest.skip("this transformers has no ProphetNet")
    config = transformers.ProphetNetConfig(
        vocab_size=16, hidden_size=8, encoder_ffn_dim=8, decoder_ffn_dim=8, num_encoder_layers=1,
        num_decoder_layers=1, num_encoder_attention_heads=2, num_decoder_attention_heads=2, ngram=2,
        is_decoder=True, add_cross_attention=False)
    torch.manual_seed(0)
    model = transformers.ProphetNetForCausalLM(config).double().eval()
    ids = torch.tensor([[1, 5, 7, 3]])
    main_stream = model.prophetnet.decoder(input_ids=ids).last_hidden_state
    # the fused path would compute these; they are not the model's logits
    assert not torch.allclose(model.lm_head(main_stream), model(input_ids=ids).logits)
    with pytest.raises(TypeError, match="ProphetNetForCausalLM computes its logits from the first of its n-gram"):
        lm_head_of(model)
    with pytest.raises(TypeError, match="not from the body's last_hidden_state"):
        final_hidden_states(model, ids)


def _peft_model(config):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = tiny_causal_lm("llama")
    model = peft.get_peft_model(base, config(peft))
    with torch.no_grad():  # LoRA's B starts at zero: give the adapters an effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model.eval()


def test_lora_adapters_inside_the_body_run():
    """A PEFT LoRA model: the adapters inside the layers are part of the hidden states, so the fused path
    reproduces the wrapped model's logits."""
    model = _peft_model(lambda peft: peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"]))
    ids, mask = _batch()
    hidden = final_hidden_states(model, ids, attention_mask=mask)
    got = lm_head_of(model).logprobs(hidden[:, :-1], ids[:, 1:])
    want = reference_token_logps(model, ids, mask)
    keep = (mask[:, 1:] * mask[:, :-1]).bool()
    torch.testing.assert_close(got.double()[keep], want[keep], rtol=1e-6, atol=1e-6)
    with model.disable_adapter():  # the adapters really change the hidden states
        assert not torch.allclose(final_hidden_states(model, ids, attention_mask=mask), hidden)


def test_prompt_learning_and_lm_head_adapters_are_refused():
    model = _peft_model(lambda peft: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    ids, _ = _batch()
    assert model(input_ids=ids).logits.shape[1] == ids.shape[1] + 3  # the wrapper prepends virtual tokens
    with pytest.raises(TypeError, match="prompt-learning adapter .*PromptTuningConfig.* would leave them out"):
        final_hidden_states(model, ids)
    model = _peft_model(lambda peft: peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["lm_head"]))
    with pytest.raises(TypeError, match="not a plain nn.Linear"):
        lm_head_of(model)

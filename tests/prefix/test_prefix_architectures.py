"""Prefix sharing and ``lm_head_of`` across transformers' decoder-only architectures: equal or refused.

For every architecture that prefix sharing runs, one shared forward of a packed batch (two prompts in
one row, K=2) gives each response the log-probs (and, for some, the parameter gradients) of a separate
``prompt + response`` forward of an untouched eager copy, and ``lm_head_of`` applied to
``final_hidden_states`` gives ``model(ids).logits``' log-probs. Every architecture whose tokens meet
outside causal attention, or whose attention or positions the layout cannot reach, is refused with a
``ValueError`` naming the feature, before it can return a wrong number.

Models are real transformers architectures from tiny configs with random weights (one layer where the
architecture allows); a class missing from the installed transformers is skipped.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pygpo.integrations.hidden_states import final_hidden_states, lm_head_of  # noqa: E402
from pygpo.integrations.transformers import enable_prefix_sharing, response_logprobs  # noqa: E402
from pygpo.prefix import pack  # noqa: E402
from prefix_reference import single_torch_thread  # noqa: F401, E402

VOCAB = 61
_BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
             eos_token_id=2, tie_word_embeddings=False)
_MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
# multi-head latent attention with value heads (8) narrower than query/key heads (8 + 4)
_MLA = dict(num_key_value_heads=4, head_dim=4, kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            n_group=1, topk_group=1, first_k_dense_replace=0)

_DROP = object()  # an override that removes a _BASE key (the config's own default or alias applies)

# name -> (config class, model class, config overrides)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=64)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", _MOE),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(_MOE, shared_expert_intermediate_size=16)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", _MOE),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",  # no attention softcap: runs; final softcap in the head
               dict(attn_logit_softcapping=None, final_logit_softcapping=3.0, query_pre_attn_scalar=8,
                    sliding_window=64)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(num_hidden_layers=2, sliding_window=64,
                                                                  query_pre_attn_scalar=8)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(num_hidden_layers=2, sliding_window=64, logit_scale=0.5)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(_MOE, logits_scaling=4.0)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(head_dim=_DROP)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(head_dim=_DROP, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "jetmoe": ("JetMoeConfig", "JetMoeForCausalLM", dict(_MOE, head_dim=_DROP, kv_channels=8)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", _MLA),
    "minicpm3": ("MiniCPM3Config", "MiniCPM3ForCausalLM", dict(_MLA, scale_emb=2.0, dim_model_base=8)),
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM", dict(_MOE, intermediate_size_mlp=48)),
}
# a sample of them also checks every parameter's gradient
GRADIENTS = ("llama", "gemma3_text", "jetmoe", "deepseek_v3", "llama4_text")


def _build(cfg_name: str, cls_name: str, overrides: dict):
    cfg_cls, cls = getattr(transformers, cfg_name, None), getattr(transformers, cls_name, None)
    if cfg_cls is None or cls is None:
        pytest.skip(f"this transformers has no {cls_name}")
    kwargs = {k: v for k, v in {**_BASE, **overrides}.items() if v is not _DROP}
    config = cfg_cls(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(config).float().eval()
    with torch.no_grad():  # random (not neutral) norms, biases and scales, so every term is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "scale" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _arch(name: str, **extra):
    cfg_name, cls_name, overrides = ARCHS[name]
    return _build(cfg_name, cls_name, {**overrides, **extra})


def _data(seed: int = 0):
    """Three prompts with two responses each; packed two documents to a row."""
    rng = random.Random(seed)
    tok = lambda m: [rng.randrange(3, VOCAB) for _ in range(m)]  # noqa: E731
    prompts = [tok(n) for n in (4, 2, 5)]
    responses = [[tok(rng.randint(1, 5)), tok(rng.randint(1, 5))] for _ in prompts]
    longest = max(len(p) + sum(map(len, r)) for p, r in zip(prompts, responses))
    batch = pack(prompts, responses, max_tokens=2 * longest)
    assert batch.input_ids.shape[0] < len(prompts)  # some row holds two prompts
    return prompts, responses, batch


def _separate(model, prompts, responses, batch) -> torch.Tensor:
    """Per response of ``batch``: sum of log p(y_t | prompt, y_<t) from its own unshared forward."""
    out = []
    for e, k in zip(batch.response_example.tolist(), batch.response_rank.tolist()):
        p, y = prompts[e], responses[e][k]
        logits = model(input_ids=torch.tensor([p + y]), use_cache=False).logits[0]
        logp = torch.log_softmax(logits[len(p) - 1:-1].double(), dim=-1)
        out.append(logp.gather(-1, torch.tensor(y)[:, None]).sum())
    return torch.stack(out)


@pytest.mark.parametrize("name", list(ARCHS))
def test_shared_forward_equals_separate_forwards(name):
    ref = _arch(name)
    shared = enable_prefix_sharing(copy.deepcopy(ref), backend="torch")
    prompts, responses, batch = _data()
    got = response_logprobs(shared, batch)
    want = _separate(ref, prompts, responses, batch)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    if name not in GRADIENTS:
        return
    w = torch.linspace(-1.0, 1.5, len(want))  # any weighting, as a DPO loss would apply
    (got * w).sum().backward()
    (want * w).sum().backward()
    top = max(float(p.grad.norm()) for p in ref.parameters() if p.grad is not None)
    for (pname, p_s), (_, p_r) in zip(shared.named_parameters(), ref.named_parameters()):
        assert (p_s.grad is None) == (p_r.grad is None), pname
        if p_r.grad is not None:  # relative to the gradient's size, floored for ones that are zero in theory
            scale = max(float(p_r.grad.norm()), 1e-4 * top)
            assert float((p_s.grad - p_r.grad).norm()) / scale < 1e-4, pname


# --- (a): lm_head_of(final_hidden_states) reproduces model(ids).logits ------------------------------------

HEADS = {
    **ARCHS,
    # logit transforms of models prefix sharing refuses, but whose logits lm_head_of must still reproduce
    "recurrent_gemma": ("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM",
                        dict(head_dim=_DROP, num_key_value_heads=_DROP, logits_soft_cap=0.5, lru_width=32,
                             block_types=["attention"])),
    "xlstm": ("xLSTMConfig", "xLSTMForCausalLM", dict(head_dim=_DROP, num_heads=4, output_logit_soft_cap=0.5)),
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM", dict(lm_head_multiplier=0.5)),
    "inkling_text": ("InklingTextConfig", "InklingForCausalLM",
                     dict(_MOE, unpadded_vocab_size=VOCAB - 3, logits_mup_width_multiplier=4.0)),
}


@pytest.mark.parametrize("name", list(HEADS))
def test_lm_head_of_reproduces_the_logits(name):
    model = _build(*HEADS[name])
    ids = torch.randint(3, VOCAB - 3, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
        want = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        got = lm_head_of(model).logprobs(final_hidden_states(model, ids)[:, :-1], ids[:, 1:])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, match", [
    ("bert", r"BertLMHeadModel computes its logits with parameters outside its decoder body and lm_head "
             r"\(cls\.predictions"),
    ("dory", r"DoryLMHead, an nn.Linear with its own forward and parameters logit_scale"),
])
def test_lm_head_of_refuses_heads_it_cannot_reproduce(name, match):
    specs = {
        "bert": ("BertConfig", "BertLMHeadModel", dict(head_dim=_DROP, num_key_value_heads=_DROP, is_decoder=True)),
        "dory": ("DoryConfig", "DoryForCausalLM", {}),
    }
    model = _build(*specs[name])
    with pytest.raises(TypeError, match=match):
        lm_head_of(model)


# --- refused at enable_prefix_sharing -----------------------------------------------------------------------

REFUSED_AT_ENABLE = {
    # recurrent / state-space / linear-attention layers: their state runs along the packed row
    "jamba": (("JambaConfig", "JambaForCausalLM", dict(_MOE, num_hidden_layers=2, attn_layer_period=2,
                                                       attn_layer_offset=1, expert_layer_period=2, mamba_d_state=4,
                                                       mamba_dt_rank=4, use_mamba_kernels=False)),
              r"JambaForCausalLM has recurrent layers"),
    "qwen3_next": (("Qwen3NextConfig", "Qwen3NextForCausalLM",
                    dict(_MOE, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                         shared_expert_intermediate_size=16)),
                   r"Qwen3NextForCausalLM has recurrent layers"),
    "minimax": (("MiniMaxConfig", "MiniMaxForCausalLM", dict(_MOE, num_hidden_layers=2,
                                                             layer_types=["linear_attention", "full_attention"])),
                r"MiniMaxForCausalLM has layers of type linear_attention"),
    "lfm2": (("Lfm2Config", "Lfm2ForCausalLM", dict(num_hidden_layers=2, layer_types=["conv", "full_attention"])),
             r"Lfm2ForCausalLM has layers of type conv"),
    # a sparse key selection (DeepSeek sparse attention's indexer)
    "deepseek_v32": (("DeepseekV32Config", "DeepseekV32ForCausalLM", dict(_MLA)),
                     r"DeepseekV32ForCausalLM has layers of type indexed_attention"),
    # cross-attention layers (encoder-decoder families' causal LMs)
    "bart": (("BartConfig", "BartForCausalLM", dict(head_dim=_DROP, d_model=32, decoder_attention_heads=4,
                                                    encoder_attention_heads=4, decoder_ffn_dim=48, encoder_ffn_dim=48,
                                                    decoder_layers=1, encoder_layers=1)),
             r"BartForCausalLM has non-causal attention \(model\.decoder\.layers\.0\.encoder_attn"),
    # learned positions counted from the padding index
    "roberta": (("RobertaConfig", "RobertaForCausalLM", dict(head_dim=_DROP, num_key_value_heads=_DROP,
                                                             is_decoder=True)),
                r"RobertaForCausalLM numbers its learned positions from its padding index"),
}


@pytest.mark.parametrize("name", list(REFUSED_AT_ENABLE))
def test_refused_at_enable(name):
    spec, match = REFUSED_AT_ENABLE[name]
    model = _build(*spec)
    with pytest.raises(ValueError, match=match):
        enable_prefix_sharing(model, backend="torch")
    assert model.config._attn_implementation == "eager" and not model._forward_pre_hooks  # left unchanged


def test_model_without_position_ids_is_refused():
    """A decoder body whose forward takes no ``position_ids`` (as the BART family's) swallows the layout's
    positions in ``**kwargs`` and numbers the packed row 0..S-1: every later response had shifted positions."""

    class NoPositionsModel(transformers.LlamaModel):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            kwargs.pop("position_ids", None)
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    model = _arch("llama")
    model.model = NoPositionsModel(model.config)
    with pytest.raises(ValueError, match=r"NoPositionsModel\.forward takes no position_ids"):
        enable_prefix_sharing(model, backend="torch")


def test_convolution_in_the_layer_stack_is_refused_whatever_the_config_says():
    """The convolution scan stands behind the layer types: a short-convolution layer that the config does
    not declare (here: an LFM2 whose layer_types were rewritten after construction) is still refused."""
    model = _build("Lfm2Config", "Lfm2ForCausalLM", dict(num_hidden_layers=2, layer_types=["conv", "full_attention"]))
    model.config.layer_types = ["full_attention", "full_attention"]
    with pytest.raises(ValueError, match=r"Lfm2ForCausalLM convolves over the sequence \(layers\.0\.conv\.conv"):
        enable_prefix_sharing(model, backend="torch")


# --- refused at forward time -------------------------------------------------------------------------------

def _refused_forward(model, match, *, with_layout=True):
    shared = enable_prefix_sharing(model, backend="torch")
    prompts, responses, batch = _data()
    with pytest.raises(ValueError, match=match):
        if with_layout:
            response_logprobs(shared, batch)
        else:
            shared(input_ids=batch.input_ids, use_cache=False)


@pytest.mark.parametrize("name, cfg", [
    ("stablelm", ("StableLmConfig", "StableLmForCausalLM", dict(head_dim=_DROP))),
    ("nemotron", ("NemotronConfig", "NemotronForCausalLM", {})),
])
def test_layers_that_drop_the_layout_are_refused(name, cfg):
    """These decoder layers do not pass their keyword arguments to the attention: without the check every
    response silently attended to the others in its row."""
    _refused_forward(_build(*cfg), r"Attention was called without the prefix_layout the model was given")


@pytest.mark.parametrize("with_layout", [True, False], ids=["layout", "no_layout"])
def test_attention_with_its_own_mask_is_refused(with_layout):
    """Doge adds a learned dynamic mask onto the causal mask that transformers no longer builds: without a
    layout its attention silently saw future tokens."""
    model = _build("DogeConfig", "DogeForCausalLM", {})
    _refused_forward(model, r"DogeAttention attends under a mask or bias it builds itself", with_layout=with_layout)


@pytest.mark.parametrize("with_layout", [True, False], ids=["layout", "no_layout"])
def test_chunked_attention_longer_than_a_chunk_is_refused(with_layout):
    model = _arch("llama4_text", attention_chunk_size=6)
    assert model.config.layer_types == ["chunked_attention"]
    _refused_forward(model, r"chunked attention \(attention_chunk_size=6\)", with_layout=with_layout)


def test_row_offset_temperature_tuning_is_refused_past_floor_scale():
    """Llama 4 scales NoPE-layer queries by the row offset, not the position id."""
    model = _arch("llama4_text", num_hidden_layers=2, no_rope_layers=[1, 0], attn_temperature_tuning=True,
                  floor_scale=4)
    _refused_forward(model, r"scales the queries of its NoPE layers by the row offset .*floor_scale=4")


@pytest.mark.parametrize("rope", ["longrope", "dynamic"])
def test_length_dependent_rope_is_refused_past_its_original_context(rope):
    if rope == "longrope":
        params = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 4, long_factor=[2.0] * 4,
                      original_max_position_embeddings=8)
        model = _arch("phi3", rope_parameters=params, original_max_position_embeddings=8)
    else:
        model = _arch("llama", rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
                      max_position_embeddings=8)
    _refused_forward(model, rf"rotary embedding \({rope}\) changes its frequencies for sequences longer than 8")


def test_length_dependent_rope_runs_within_its_original_context():
    params = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 4, long_factor=[2.0] * 4,
                  original_max_position_embeddings=64)
    ref = _arch("phi3", rope_parameters=params, original_max_position_embeddings=64)
    shared = enable_prefix_sharing(copy.deepcopy(ref), backend="torch")
    prompts, responses, batch = _data()
    torch.testing.assert_close(response_logprobs(shared, batch).double(), _separate(ref, prompts, responses, batch),
                               rtol=1e-5, atol=1e-6)


def test_attention_switched_away_after_enabling_is_refused():
    """set_attn_implementation after enable_prefix_sharing: the layout would be ignored by every layer."""
    model = enable_prefix_sharing(_arch("llama"), backend="torch")
    model.set_attn_implementation("sdpa")
    prompts, responses, batch = _data()
    with pytest.raises(ValueError, match=r"without calling the prefix-sharing attention .*'sdpa'"):
        response_logprobs(model, batch)

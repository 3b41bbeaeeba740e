"""Prefix sharing in models with sliding-window layers and attention sinks: the key equivalence (one
shared forward gives every response the log-probs and parameter gradients of its own ``prompt +
response`` forward of an untouched eager-attention copy) with windows of 3 positions, shorter than
every packed row, so the window cuts into prompts and responses.

Mistral (a window on every layer), Gemma 3 (local and global layers alternating), and GPT-OSS, Granite
SWA (dense and MoE) and Flint (local and global layers with learned sinks on both).
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pygpo.integrations.transformers import enable_prefix_sharing  # noqa: E402
from pygpo.prefix import pack  # noqa: E402
from prefix_reference import single_torch_thread  # noqa: F401, E402
from test_prefix_transformers import VOCAB, _assert_equivalent, _data  # noqa: E402

WINDOW = 3
#: Models with learned attention sinks (``s_aux``) that prefix sharing runs.
SINK_MODELS = ("gpt_oss", "granite_swa", "granitemoe_swa", "flint")
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, attn_implementation="eager")


def _model(arch: str):
    if arch == "mistral":
        cfg, cls = transformers.MistralConfig(sliding_window=WINDOW, **COMMON), transformers.MistralForCausalLM
    elif arch == "gemma3":
        if not hasattr(transformers, "Gemma3ForCausalLM"):
            pytest.skip("this transformers has no Gemma 3")
        cfg = transformers.Gemma3TextConfig(head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
                                            layer_types=["sliding_attention", "full_attention"], **COMMON)
        cls = transformers.Gemma3ForCausalLM
    elif arch in SINK_MODELS:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL_LM

        if arch not in CONFIG_MAPPING or not hasattr(transformers, CAUSAL_LM.get(arch, "")):
            pytest.skip(f"this transformers has no {arch}")
        extra = dict(head_dim=8, num_local_experts=4, num_experts_per_tok=2) if arch != "granite_swa" else {}
        cfg = CONFIG_MAPPING[arch](sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                                   **extra, **COMMON)
        cls = getattr(transformers, CAUSAL_LM[arch])
    else:
        raise ValueError(arch)
    torch.manual_seed(0)
    model = cls(cfg).float()
    with torch.no_grad():  # sinks start at zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0.0, 1.5)
    return model


@pytest.mark.parametrize("arch", ["mistral", "gemma3", *SINK_MODELS])
@pytest.mark.parametrize("max_tokens", [None, 32], ids=["rows", "packed"])
def test_shared_forward_equals_separate_forwards(arch, max_tokens):
    ref = _model(arch)
    shared = enable_prefix_sharing(copy.deepcopy(ref), backend="torch")
    prompts, responses = _data(11, 4, None)
    batch = pack(prompts, responses, max_tokens=max_tokens)
    assert int(batch.layout.position_ids().max()) + 1 > WINDOW
    _assert_equivalent(shared, ref, batch, prompts, responses)


def test_triton_kernels_with_window_and_sinks_inside_gpt_oss():
    """The Triton kernels (interpreted on CPU) pass the same equivalence."""
    ref = _model("gpt_oss")
    shared = enable_prefix_sharing(copy.deepcopy(ref), backend="triton")
    prompts, responses = _data(5, 3, 2)
    _assert_equivalent(shared, ref, pack(prompts, responses), prompts, responses)


@pytest.mark.parametrize("padding", ["none", "left"])
def test_gpt_oss_without_layout_behaves_like_its_eager_self(padding):
    ref = _model("gpt_oss").eval()
    shared = enable_prefix_sharing(copy.deepcopy(ref), backend="torch")
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[0, :3] = 0
    want = ref(input_ids=ids, attention_mask=mask).logits
    got = shared(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)

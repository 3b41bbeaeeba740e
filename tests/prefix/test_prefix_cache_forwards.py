"""A model with prefix sharing enabled, run without ``prefix_layout``, must still behave like the stock model
when it continues a KV cache: several new tokens at once, and generation from a left-padded batch (the
reference is an unpatched copy with transformers' SDPA attention)."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pygpo.integrations.transformers import enable_prefix_sharing  # noqa: E402
from prefix_reference import single_torch_thread  # noqa: F401, E402

VOCAB = 61


def _models(arch: str, **extra):
    cfg = getattr(transformers, f"{arch}Config")(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation="sdpa", **extra)
    torch.manual_seed(0)
    ref = getattr(transformers, f"{arch}ForCausalLM")(cfg).float().eval()
    return ref, enable_prefix_sharing(copy.deepcopy(ref), backend="torch")


@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "all-ones-mask"])
def test_several_tokens_continue_a_cache(mask):
    ref, shared = _models("Llama")
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=ids).logits[:, 4:]
        kw = (lambda n: {"attention_mask": torch.ones(2, n, dtype=torch.long)}) if mask else (lambda n: {})
        cache = shared(input_ids=ids[:, :4], use_cache=True, **kw(4)).past_key_values
        got = shared(input_ids=ids[:, 4:], past_key_values=cache, use_cache=True, **kw(9)).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, extra", [("Llama", {}), ("Mistral", {"sliding_window": 5})], ids=["llama", "mistral-sw5"])
def test_generate_from_left_padded_batch(arch, extra):
    ref, shared = _models(arch, **extra)
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    want, got = ref.generate(**kw), shared.generate(**kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "left-padded"])
def test_static_cache_is_refused(pad):
    # a static cache's keys span the whole cache (filled or not) and generate drops the padding mask for
    # an attention without a registered mask builder: the scores would be wrong, so it is refused by name
    ref, shared = _models("Llama")
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if pad:
        mask[1, :2] = 0
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    ref.generate(**kw)  # the stock model generates with it
    with pytest.raises(ValueError, match="static"):
        shared.generate(**kw)


def test_layout_forward_refuses_a_cache_under_either_name():
    from pygpo.prefix import pack

    _, shared = _models("Llama")
    batch = pack([[1, 2, 3]], [[[4, 5], [6, 7, 8]]])
    for name in ("past_key_values", "cache"):
        cache = transformers.DynamicCache()
        with pytest.raises(ValueError, match="pass no past_key_values"):
            shared(input_ids=batch.input_ids, prefix_layout=batch.layout, **{name: cache})
        assert cache.get_seq_length() == 0  # nothing was written into it

"""pygpo.ref_cache on a real float64 Llama: values, batching invariance, reuse, refusals (weights, config,
class, PEFT adapter state, data, temperature), bad input."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from pygpo.fingerprint import fingerprint_config, fingerprint_examples, fingerprint_model  # noqa: E402
from pygpo.ref_cache import (  # noqa: E402
    FingerprintMismatchError,
    ReferenceCache,
    compute_reference_cache,
    open_reference_cache,
)
from tiny_models import reference_token_logps, tiny_causal_lm  # noqa: E402

# K = 2 (pair form), K = 1 (unpaired), K = 3; lengths differ so batches need padding.
EXAMPLES = [
    {"prompt_ids": [3, 4, 5], "chosen_ids": [6, 7], "rejected_ids": [8, 9, 10, 11]},
    {"prompt_ids": [12], "responses": [[13, 14, 15, 16, 17]]},
    {"prompt_ids": [20, 21, 22, 23], "responses": [[24], [25, 26, 27], [28, 29]]},
    {"prompt_ids": torch.tensor([30, 31]), "responses": [torch.tensor([32, 33, 34]), [35]]},
]


def _expected(model, examples, temperature=1.0):
    """Per-response float64 token log-probs from separate unpadded forwards and plain logits."""
    out = []
    for ex in examples:
        prompt = [int(t) for t in ex["prompt_ids"]]
        responses = ex.get("responses") or [ex["chosen_ids"], ex["rejected_ids"]]
        row = []
        for r in responses:
            seq = torch.tensor([prompt + [int(t) for t in r]])
            row.append(reference_token_logps(model, seq, temperature=temperature)[0, len(prompt) - 1:])
        out.append(row)
    return out


@pytest.fixture
def model():
    return tiny_causal_lm("llama")


def test_values_equal_float64_logits(model, tmp_path):
    cache = compute_reference_cache(model, EXAMPLES, tmp_path / "ref.safetensors", batch_size=3,
                                    temperature=0.7, progress=False)
    expected = _expected(model, EXAMPLES, temperature=0.7)
    assert len(cache) == 4 and cache.num_responses == 8
    assert cache.responses_per_example.tolist() == [2, 1, 3, 2]
    assert cache.response_example.tolist() == [0, 0, 1, 2, 2, 2, 3, 3]
    assert cache.response_rank.tolist() == [0, 1, 0, 0, 1, 2, 0, 1]

    seq = cache.sequence_logps([0, 1, 2, 3])
    tok, mask = cache.token_logps([0, 1, 2, 3])
    assert seq.dtype == tok.dtype == torch.float32 and mask.dtype == torch.bool
    assert seq.shape == (4, 3) and tok.shape == mask.shape == (4, 3, 5)
    for i, row in enumerate(expected):
        for k in range(3):
            if k >= len(row):
                assert math.isnan(seq[i, k]) and not mask[i, k].any() and not tok[i, k].any()
                continue
            n = len(row[k])
            assert mask[i, k].tolist() == [True] * n + [False] * (5 - n)
            torch.testing.assert_close(tok[i, k, :n].double(), row[k], rtol=1e-6, atol=1e-6)
            assert not tok[i, k, n:].any()
            torch.testing.assert_close(seq[i, k].double(), row[k].sum(), rtol=1e-6, atol=1e-6)
    # a subset, in any order, repeated
    torch.testing.assert_close(cache.sequence_logps(torch.tensor([3, 0, 3])), seq[[3, 0, 3], :2])
    assert cache.sequence_logps([1]).shape == (1, 1)


def test_batching_and_padding_invariance(model, tmp_path):
    one = compute_reference_cache(model, EXAMPLES, tmp_path / "a.safetensors", batch_size=1, progress=False)
    three = compute_reference_cache(model, EXAMPLES, tmp_path / "b.safetensors", batch_size=3, progress=False)
    idx = list(range(len(EXAMPLES)))
    torch.testing.assert_close(one.sequence_logps(idx), three.sequence_logps(idx), rtol=1e-6, atol=1e-6,
                               equal_nan=True)
    torch.testing.assert_close(one.token_logps(idx), three.token_logps(idx), rtol=1e-6, atol=1e-6)


def test_reuse_without_recomputation_when_matching(model, tmp_path):
    path = tmp_path / "ref.safetensors"
    forwards = []
    model.model.register_forward_hook(lambda *_: forwards.append(1))
    first = open_reference_cache(path, model, EXAMPLES, batch_size=4, progress=False)
    assert len(forwards) == 2  # 8 responses in batches of 4
    second = open_reference_cache(path, model, EXAMPLES, batch_size=4, progress=False)
    assert len(forwards) == 2  # loaded, not recomputed
    idx = [0, 1, 2, 3]
    assert torch.equal(first.token_logps(idx)[0], second.token_logps(idx)[0])
    torch.testing.assert_close(first.sequence_logps(idx), second.sequence_logps(idx), rtol=0, atol=0,
                               equal_nan=True)
    assert second.model_fingerprint == fingerprint_model(model)
    assert second.config_fingerprint == fingerprint_config(model)
    assert second.data_fingerprint == fingerprint_examples(EXAMPLES)
    assert second.temperature == 1.0 and second.meta["model_class"] == "LlamaForCausalLM"
    assert ReferenceCache.load(path).num_responses == 8  # loading without checks


def test_refuses_changed_weights_data_or_temperature(model, tmp_path):
    path = tmp_path / "ref.safetensors"
    cache = open_reference_cache(path, model, EXAMPLES, progress=False)

    changed_data = [dict(ex) for ex in EXAMPLES]
    changed_data[1] = {"prompt_ids": [12], "responses": [[13, 14, 15, 16, 18]]}
    with pytest.raises(FingerprintMismatchError, match="data differs") as err:
        open_reference_cache(path, model, changed_data, progress=False)
    message = str(err.value)
    assert cache.data_fingerprint[:12] in message and fingerprint_examples(changed_data)[:12] in message
    assert "Delete the file" in message and "model weights" not in message

    with pytest.raises(FingerprintMismatchError, match=r"temperature differs \(stored 1.0, current 0.5\)"):
        open_reference_cache(path, model, EXAMPLES, temperature=0.5, progress=False)

    with torch.no_grad():
        model.model.norm.weight[0] += 1e-12
    with pytest.raises(FingerprintMismatchError, match="model weights differ") as err:
        open_reference_cache(path, model, EXAMPLES, progress=False)
    assert cache.model_fingerprint[:12] in str(err.value)
    assert isinstance(err.value, ValueError)

    with pytest.raises(FingerprintMismatchError, match="data differs.*model weights differ"):
        ReferenceCache.load(path, model=model, examples=changed_data)


def test_refuses_another_format_version(model, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "ref.safetensors"
    compute_reference_cache(model, EXAMPLES, path, progress=False)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["pygpo_ref_cache"])
    meta["format_version"] = 999
    save_file(tensors, str(path), metadata={"pygpo_ref_cache": json.dumps(meta)})
    with pytest.raises(FingerprintMismatchError, match=r"format version differs \(stored 999"):
        ReferenceCache.load(path)
    save_file(tensors, str(path), metadata={"other": "x"})
    with pytest.raises(ValueError, match="not a pygpo reference cache"):
        ReferenceCache.load(path)


def test_fingerprints():
    pair = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]}]
    listed = [{"prompt_ids": [1, 2], "responses": [[3], [4, 5]]}]
    assert fingerprint_examples(pair) == fingerprint_examples(listed)
    # the boundary between prompt and response is part of the data
    assert fingerprint_examples(listed) != fingerprint_examples([{"prompt_ids": [1], "responses": [[2, 3], [4, 5]]}])
    assert fingerprint_examples(listed) != fingerprint_examples([{"prompt_ids": [1, 2], "responses": [[4, 5], [3]]}])

    a, b = tiny_causal_lm("llama", tied=True), tiny_causal_lm("llama", tied=True)
    assert fingerprint_model(a) == fingerprint_model(b) == fingerprint_model(torch.nn.DataParallel(a))
    assert fingerprint_model(a, threads=1) == fingerprint_model(a, threads=3)
    with pytest.raises(ValueError, match="threads must be a positive int or None, got 0"):
        fingerprint_model(a, threads=0)
    assert fingerprint_model(a) != fingerprint_model(a.to(torch.float32))  # dtype is part of it
    assert fingerprint_model(b) != fingerprint_model(tiny_causal_lm("llama", tied=True, seed=1))


@pytest.mark.parametrize("bad,match", [
    ({"responses": [[1]]}, r"examples\[1\] has no field 'prompt_ids'"),
    ({"prompt_ids": [1], "responses": []}, r"examples\[1\]\['responses'\] is empty"),
    ({"prompt_ids": [1], "responses": [[2], []]}, r"examples\[1\]\['responses'\]\[1\] is empty"),
    ({"prompt_ids": [], "responses": [[2]]}, r"examples\[1\]\['prompt_ids'\] is empty"),
    ({"prompt_ids": [1], "chosen_ids": [2]}, r"examples\[1\] has no field 'rejected_ids'"),
    ({"prompt_ids": [1]}, r"examples\[1\] has no field 'responses'"),
    ({"prompt_ids": [1], "responses": [[2]], "chosen_ids": [3], "rejected_ids": [4]}, r"examples\[1\] has both"),
    ({"prompt_ids": [1.5], "responses": [[2]]}, r"examples\[1\]\['prompt_ids'\] must be a flat sequence of integer"),
    ({"prompt_ids": [1], "responses": [[-2]]}, r"examples\[1\]\['responses'\]\[0\] holds a negative token id"),
    ({"prompt_ids": [1], "responses": [[128]]}, r"examples\[1\] holds token id 128, outside the model's vocabulary"),
    # model inputs the cache would silently ignore
    ({"prompt_ids": [1], "responses": [[2]], "attention_mask": [1, 1]},
     r"examples\[1\] has the model input field\(s\) \['attention_mask'\], which reference scores cannot honour"),
    ({"prompt_ids": [1], "responses": [[2]], "pixel_values": [[0.5]]}, r"field\(s\) \['pixel_values'\]"),
    ({"prompt_ids": [1], "responses": [[2]], "position_ids": [0, 1], "token_type_ids": [0, 0]},
     r"field\(s\) \['position_ids', 'token_type_ids'\]"),
    ({"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], "chosen_attention_mask": [1]},
     r"field\(s\) \['chosen_attention_mask'\]"),
    ("text", r"examples\[1\] must be a dict"),
])
def test_bad_examples_name_the_index_and_field(model, tmp_path, bad, match):
    path = tmp_path / "ref.safetensors"
    with pytest.raises((KeyError, TypeError, ValueError), match=match):
        compute_reference_cache(model, [EXAMPLES[0], bad], path, progress=False)
    assert not path.exists()


def test_bad_arguments(model, tmp_path):
    path = tmp_path / "ref.safetensors"
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        compute_reference_cache(model, EXAMPLES, path, batch_size=0)
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        compute_reference_cache(model, EXAMPLES, path, temperature=0.0)
    with pytest.raises(ValueError, match="examples is empty"):
        compute_reference_cache(model, [], path)
    with pytest.raises(ValueError, match="is a directory"):
        compute_reference_cache(model, EXAMPLES, tmp_path)
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        open_reference_cache(path, model, EXAMPLES, batchsize=2)
    with pytest.raises(FileNotFoundError, match="no reference cache"):
        ReferenceCache.load(path)
    cache = compute_reference_cache(model, EXAMPLES, path, progress=False)
    with pytest.raises(IndexError, match="example index 4 is out of range: the cache holds 4 examples"):
        cache.sequence_logps([0, 4])
    with pytest.raises(IndexError, match="example index -1 is out of range"):
        cache.token_logps([-1])
    with pytest.raises(TypeError, match="1-D sequence of integers"):
        cache.sequence_logps([[0, 1]])


# ------------------------------------------------------------------ what the fingerprints cover


def _rebuilt(model, **config_changes):
    """A model of ``model``'s class with ``config_changes`` and bit-identical tensors."""
    config = copy.deepcopy(model.config)
    for key, value in config_changes.items():
        if key == "rope_theta":
            config.rope_parameters = {**config.rope_parameters, "rope_theta": value}
        else:
            setattr(config, key, value)
    other = type(model)(config).to(torch.float64).eval()
    other.load_state_dict(model.state_dict(), strict=True)
    return other


def _sums(model, examples):
    return torch.tensor([[float(r.sum()) for r in row] for row in _expected(model, examples)[:1]], dtype=torch.float64)


@pytest.mark.parametrize("arch,key,value,shown", [
    ("llama", "rms_norm_eps", 0.1, "rms_norm_eps: stored 1e-06, current 0.1"),
    ("llama", "rope_theta", 3.0, "rope_parameters.rope_theta: stored 10000.0, current 3.0"),
    ("gemma2", "final_logit_softcapping", 1.0, "final_logit_softcapping: stored 3.0, current 1.0"),
    ("mistral", "sliding_window", 2, "sliding_window: stored null, current 2"),
])
def test_refuses_a_config_change_with_identical_weights(tmp_path, arch, key, value, shown):
    before = tiny_causal_lm(arch)
    after = _rebuilt(before, **{key: value})
    assert fingerprint_model(after) == fingerprint_model(before)
    path = tmp_path / "ref.safetensors"
    cache = open_reference_cache(path, before, EXAMPLES[:1], progress=False)
    # the scores the cache would serve are wrong for the changed model
    assert not torch.allclose(cache.sequence_logps([0]).double(), _sums(after, EXAMPLES), atol=1e-6)
    with pytest.raises(FingerprintMismatchError, match="model config differs") as err:
        open_reference_cache(path, after, EXAMPLES[:1], progress=False)
    assert f"model config differs ({shown})" in str(err.value)
    assert "weights" not in str(err.value) and "Delete the file" in str(err.value)


def test_refuses_another_architecture_with_identical_tensors(model, tmp_path):
    import transformers as tf

    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")
    config = tf.MistralConfig(**{k: getattr(model.config, k) for k in keys}, sliding_window=3)
    config._attn_implementation = "eager"
    mistral = tf.MistralForCausalLM(config).to(torch.float64).eval()
    mistral.load_state_dict(model.state_dict(), strict=True)
    assert fingerprint_model(mistral) == fingerprint_model(model)
    path = tmp_path / "ref.safetensors"
    cache = open_reference_cache(path, model, EXAMPLES[:1], progress=False)
    assert not torch.allclose(cache.sequence_logps([0]).double(), _sums(mistral, EXAMPLES), atol=1e-6)
    with pytest.raises(FingerprintMismatchError) as err:
        open_reference_cache(path, mistral, EXAMPLES[:1], progress=False)
    message = str(err.value)
    assert 'model config differs (class: stored "LlamaForCausalLM", current "MistralForCausalLM"; ' in message
    assert "more)" in message and "weights" not in message


def test_legitimate_reuse_keeps_both_fingerprints(model, tmp_path):
    """Reloading the checkpoint, train/eval, requires_grad, another attention implementation, prefix
    sharing and wrappers leave the outputs alone: the cache is loaded, not recomputed."""
    import transformers as tf

    from pygpo.integrations.transformers import enable_prefix_sharing

    path = tmp_path / "ref.safetensors"
    first = open_reference_cache(path, model, EXAMPLES, progress=False)
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float64)
    assert reloaded.config._attn_implementation != "eager" and reloaded.config.dtype == torch.float64
    forwards = []
    reloaded.model.register_forward_hook(lambda *_: forwards.append(1))
    prefix = copy.deepcopy(reloaded)
    enable_prefix_sharing(prefix)
    for variant in (reloaded, reloaded.train(), reloaded.requires_grad_(False), prefix,
                    torch.nn.DataParallel(reloaded)):
        assert fingerprint_model(variant) == first.model_fingerprint
        assert fingerprint_config(variant) == first.config_fingerprint
        again = open_reference_cache(path, variant, EXAMPLES, progress=False)
        assert torch.equal(again.token_logps([0, 1, 2, 3])[0], first.token_logps([0, 1, 2, 3])[0])
    assert not forwards


class _LoraLinear(nn.Module):
    """A linear layer with low-rank adapters that follows PEFT's tuner-layer conventions (class attributes
    ``adapter_layer_names``/``other_param_names``, ``active_adapters``, ``disable_adapters``,
    ``merged_adapters``): ``y = base(x) + sum over active adapters of scaling * B(A(x))`` unless disabled.
    It lets the adapter-state fingerprint be tested without peft installed."""

    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling")

    def __init__(self, base: nn.Linear, names=("default", "other"), r: int = 2, alpha: float = 4.0):
        super().__init__()
        self.base_layer = base
        gen = torch.Generator().manual_seed(5)
        self.lora_A = nn.ModuleDict({n: nn.Linear(base.in_features, r, bias=False) for n in names})
        self.lora_B = nn.ModuleDict({n: nn.Linear(r, base.out_features, bias=False) for n in names})
        with torch.no_grad():
            for layer in (*self.lora_A.values(), *self.lora_B.values()):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
        self.to(base.weight.dtype)
        self.r = {n: r for n in names}
        self.lora_alpha = {n: alpha for n in names}
        self.scaling = {n: alpha / r for n in names}
        self.merged_adapters: list[str] = []
        self._active = ["default"]
        self._disabled = False

    @property
    def active_adapters(self) -> list[str]:
        return self._active

    @property
    def disable_adapters(self) -> bool:
        return self._disabled

    def forward(self, x):
        out = self.base_layer(x)
        if not self._disabled:
            for n in self._active:
                out = out + self.scaling[n] * self.lora_B[n](self.lora_A[n](x))
        return out


def test_adapter_state_is_part_of_the_config_fingerprint(tmp_path):
    """Adapter layers (PEFT's conventions, peft not needed): their disabled flag, active adapters and
    scaling change the outputs but no tensor, and each one is named in the refusal."""
    model = tiny_causal_lm("llama")
    attention = model.model.layers[0].self_attn
    attention.q_proj = _LoraLinear(attention.q_proj)
    lora = attention.q_proj
    path = tmp_path / "ref.safetensors"
    cache = open_reference_cache(path, model, EXAMPLES[:1], progress=False)
    torch.testing.assert_close(cache.sequence_logps([0]).double(), _sums(model, EXAMPLES), rtol=1e-6, atol=1e-6)
    weights = fingerprint_model(model)
    assert fingerprint_config(model.train().requires_grad_(False)) == cache.config_fingerprint
    model.eval()
    site = "model.layers.0.self_attn.q_proj"
    for change, shown, switched in [
        (lambda: setattr(lora, "_disabled", True), f"{site}.disabled: stored false, current true", True),
        (lambda: setattr(lora, "_active", ["other"]), f'{site}.active: stored ["default"], current ["other"]', True),
        (lambda: lora.scaling.update(default=6.0), f"{site}.scaling.default: stored 2.0, current 6.0", False),
    ]:
        change()
        assert not torch.allclose(cache.sequence_logps([0]).double(), _sums(model, EXAMPLES), atol=1e-6)
        # switching adapters changes which adapter weights count (idle ones are not fingerprinted)
        assert (fingerprint_model(model) != weights) == switched
        with pytest.raises(FingerprintMismatchError) as err:
            open_reference_cache(path, model, EXAMPLES[:1], progress=False)
        assert f"PEFT adapter state differs ({shown})" in str(err.value), str(err.value)
        assert ("model weights in use differ" in str(err.value)) == switched
        assert "the adapters that act changed" in str(err.value) or not switched
        assert "model weights differ" not in str(err.value) and "model config" not in str(err.value)
        lora._disabled, lora._active, lora.scaling["default"] = False, ["default"], 2.0
    assert open_reference_cache(path, model, EXAMPLES[:1], progress=False).config_fingerprint == cache.config_fingerprint


def test_peft_adapter_state_is_part_of_the_config_fingerprint(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(tiny_causal_lm("llama"), config).eval()
    path = tmp_path / "ref.safetensors"
    with wrapped.disable_adapter():  # the usual PEFT reference: the base model
        cache = open_reference_cache(path, wrapped, EXAMPLES[:1], progress=False)
        base = _sums(wrapped, EXAMPLES)
        assert open_reference_cache(path, wrapped, EXAMPLES[:1], progress=False).model_fingerprint == \
            cache.model_fingerprint  # reused under the same state
    torch.testing.assert_close(cache.sequence_logps([0]).double(), base, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(_sums(wrapped, EXAMPLES), base, atol=1e-6)  # the adapter changes the scores
    site = "model.layers.0.self_attn.q_proj"
    with pytest.raises(FingerprintMismatchError) as err:
        open_reference_cache(path, wrapped, EXAMPLES[:1], progress=False)
    assert f"PEFT adapter state differs ({site}.disabled: stored true, current false; " in str(err.value)
    assert "model weights differ" not in str(err.value)  # no tensor changed: only which ones act

    enabled = tmp_path / "enabled.safetensors"
    open_reference_cache(enabled, wrapped, EXAMPLES[:1], progress=False)
    layer = wrapped.get_base_model().model.layers[0].self_attn.q_proj
    layer.scaling["default"] *= 3
    with pytest.raises(FingerprintMismatchError, match=rf"{site}\.scaling\.default: stored 2\.0, current 6\.0"):
        open_reference_cache(enabled, wrapped, EXAMPLES[:1], progress=False)
    layer.scaling["default"] /= 3
    wrapped.add_adapter("second", config)
    wrapped.set_adapter("second")
    with pytest.raises(FingerprintMismatchError, match=rf'{site}\.active: stored \["default"\], current \["second"\]'):
        open_reference_cache(enabled, wrapped, EXAMPLES[:1], progress=False)


def test_weights_of_adapters_that_cannot_act_are_not_fingerprinted():
    """Disabled or inactive adapters' weights change no output, so no weight fingerprint; an active adapter's
    weights do, and a layer with merged adapters keeps all of its adapters' weights."""
    model = tiny_causal_lm("llama")
    attention = model.model.layers[0].self_attn
    attention.q_proj = lora = _LoraLinear(attention.q_proj)
    before = fingerprint_model(model)
    with torch.no_grad():
        lora.lora_B["other"].weight.add_(1.0)  # not active
    assert fingerprint_model(model) == before
    lora._disabled = True
    disabled = fingerprint_model(model)
    with torch.no_grad():
        lora.lora_B["default"].weight.add_(1.0)  # active but disabled
    assert fingerprint_model(model) == disabled
    lora._disabled = False
    assert fingerprint_model(model) != before  # the active adapter's weights changed
    lora.merged_adapters = ["default"]
    merged = fingerprint_model(model)
    with torch.no_grad():
        lora.lora_A["other"].weight.add_(1.0)
    assert fingerprint_model(model) != merged


def test_a_peft_reference_cache_survives_training_the_adapters(tmp_path):
    """The usual PEFT DPO reference is the base model with the adapters disabled: a cache built that way is
    reused after the adapters trained (the base scores are unchanged), and refused with them enabled."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(tiny_causal_lm("llama"), config).eval()
    path = tmp_path / "ref.safetensors"
    with wrapped.disable_adapter():
        cache = open_reference_cache(path, wrapped, EXAMPLES[:2], progress=False)
    with torch.no_grad():  # a training step on the adapters only
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.add_(0.5 * torch.randn_like(p))
    with wrapped.disable_adapter():
        again = open_reference_cache(path, wrapped, EXAMPLES[:2], progress=False)
        torch.testing.assert_close(again.sequence_logps([0]).double(), _sums(wrapped, EXAMPLES), rtol=1e-6, atol=1e-6)
    assert again.model_fingerprint == cache.model_fingerprint
    with pytest.raises(FingerprintMismatchError, match="PEFT adapter state differs"):
        open_reference_cache(path, wrapped, EXAMPLES[:2], progress=False)


def test_missing_or_unwritable_directory_is_refused_before_any_forward(model, tmp_path):
    forwards = []
    model.model.register_forward_hook(lambda *_: forwards.append(1))
    missing = tmp_path / "no" / "such" / "ref.safetensors"
    for call in (lambda p: compute_reference_cache(model, EXAMPLES, p, progress=False),
                 lambda p: open_reference_cache(p, model, EXAMPLES, progress=False)):
        with pytest.raises(FileNotFoundError, match=r"path '.*/no/such/ref.safetensors': its directory .* does not exist"):
            call(missing)
    (tmp_path / "plain_file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        compute_reference_cache(model, EXAMPLES, tmp_path / "plain_file" / "ref.safetensors", progress=False)
    if os.geteuid() != 0:  # permission bits do not stop root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match=r"path '.*locked/ref.safetensors': cannot write a file in its directory"):
            compute_reference_cache(model, EXAMPLES, locked / "ref.safetensors", progress=False)
    if os.path.isdir("/proc/self"):  # procfs takes no new files, not even from root
        with pytest.raises(PermissionError, match=r"path '/proc/ref.safetensors': cannot write a file in its directory '/proc'"):
            compute_reference_cache(model, EXAMPLES, "/proc/ref.safetensors", progress=False)
    assert not forwards
    assert not any(tmp_path.rglob(".pygpo-write-test-*"))
    compute_reference_cache(model, EXAMPLES, tmp_path / "ref.safetensors", progress=False)  # a writable one works
    assert forwards and sorted(p.name for p in tmp_path.iterdir()) == ["plain_file", "ref.safetensors"] + \
        (["locked"] if os.geteuid() != 0 else [])


def test_harmless_extra_fields_are_ignored():
    plain = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]}]
    extra = [dict(plain[0], id="row-7", prompt="text", labels=[0, 1])]
    assert fingerprint_examples(extra) == fingerprint_examples(plain)

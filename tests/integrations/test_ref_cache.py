"""pygpo.ref_cache on a real float64 Llama: values, batching invariance, reuse, refusals, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from pygpo.fingerprint import fingerprint_examples, fingerprint_model  # noqa: E402
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

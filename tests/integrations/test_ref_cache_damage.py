"""pygpo.ref_cache on damaged files: every kind of damage is a CorruptCacheError naming the file and the
remedy, never a bare safetensors error or silently wrong scores; deleting the file rebuilds it. Files of
an older format (no config fingerprint, perhaps no digest) are refused by their version."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from pygpo.ref_cache import (  # noqa: E402
    FORMAT_VERSION,
    CorruptCacheError,
    FingerprintMismatchError,
    ReferenceCache,
    ReferenceCacheError,
    compute_reference_cache,
    open_reference_cache,
)
from tiny_models import reference_token_logps, tiny_causal_lm  # noqa: E402

EXAMPLES = [
    {"prompt_ids": [3, 4, 5], "chosen_ids": [6, 7], "rejected_ids": [8, 9, 10, 11]},
    {"prompt_ids": [12], "responses": [[13, 14, 15, 16, 17]]},
    {"prompt_ids": [20, 21], "responses": [[24], [25, 26, 27], [28, 29]]},
]
ALL = [0, 1, 2]
META = "pygpo_ref_cache"


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("llama")


@pytest.fixture(scope="module")
def good(model, tmp_path_factory):
    """A cache file written once; tests damage copies of it."""
    path = tmp_path_factory.mktemp("good") / "ref.safetensors"
    compute_reference_cache(model, EXAMPLES, path, progress=False)
    return path


def _copy(good, tmp_path):
    path = tmp_path / "ref.safetensors"
    shutil.copyfile(good, path)
    return path


def _parts(path):
    """Tensors and metadata of a safetensors file, read with safetensors itself."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()[META])


def _rewrite(path, tensors, meta):
    save_file(tensors, str(path), metadata={META: meta if isinstance(meta, str) else json.dumps(meta)})


def _refused(path, model, *needles):
    """Both entry points refuse ``path`` with a CorruptCacheError naming it and the remedy."""
    for load in (lambda: ReferenceCache.load(path, model=model, examples=EXAMPLES),
                 lambda: open_reference_cache(path, model, EXAMPLES, progress=False)):
        with pytest.raises(CorruptCacheError) as info:
            load()
        message = str(info.value)
        assert str(path) in message and "Delete the file" in message, message
        for needle in needles:
            assert needle in message, (needle, message)
    return message


def test_error_classes():
    assert issubclass(CorruptCacheError, ReferenceCacheError) and issubclass(ReferenceCacheError, ValueError)
    assert issubclass(FingerprintMismatchError, ReferenceCacheError)


@pytest.mark.parametrize("damage", ["half", "seven_bytes", "empty", "garbage"])
def test_unreadable_files(good, model, tmp_path, damage):
    data = good.read_bytes()
    blob = {"half": data[: len(data) // 2], "seven_bytes": data[:7], "empty": b"",
            "garbage": bytes((i * 37 + 11) % 256 for i in range(200))}[damage]
    path = tmp_path / "ref.safetensors"
    path.write_bytes(blob)
    _refused(path, model, "not a readable safetensors file")
    assert path.read_bytes() == blob  # refused, not overwritten


def test_flipped_bytes_in_tensor_data_are_detected(good, model, tmp_path):
    path = _copy(good, tmp_path)
    data = bytearray(path.read_bytes())
    # safetensors layout: u64 little-endian header length, JSON header, then the tensor bytes
    (n,) = struct.unpack("<Q", data[:8])
    begin, end = json.loads(data[8:8 + n])["token_logps"]["data_offsets"]
    for i in range(8 + n + begin, 8 + n + end, 3):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    # the header is intact: the damage is in the values only, which safetensors reads without complaint
    damaged, _ = _parts(path)
    original, _ = _parts(good)
    assert not torch.equal(damaged["token_logps"], original["token_logps"])
    _refused(path, model, "do not match their digest")


def test_missing_tensor(good, model, tmp_path):
    path = _copy(good, tmp_path)
    tensors, meta = _parts(path)
    del tensors["token_offsets"]
    _rewrite(path, tensors, meta)
    _refused(path, model, "token_offsets", "missing")


@pytest.mark.parametrize("name,keep", [("sequence_logps", 2), ("example_offsets", 3), ("token_offsets", 5)])
def test_shortened_tensor(good, model, tmp_path, name, keep):
    path = _copy(good, tmp_path)
    tensors, meta = _parts(path)
    tensors[name] = tensors[name][:keep].clone()
    _rewrite(path, tensors, meta)
    message = _refused(path, model, repr(name), f"holds {keep} values")  # named before the digest
    assert "digest" not in message


def test_inconsistent_offsets_and_dtypes_are_named_before_the_digest(good, model, tmp_path):
    path = _copy(good, tmp_path)
    tensors, meta = _parts(path)
    bad = dict(tensors, token_offsets=tensors["token_offsets"].clone())
    bad["token_offsets"][-1] += 4  # points past the end of token_logps
    _rewrite(path, bad, meta)
    _refused(path, model, "'token_offsets'", "offsets")
    bad = dict(tensors, sequence_logps=tensors["sequence_logps"].double())
    _rewrite(path, bad, meta)
    _refused(path, model, "'sequence_logps'", "float32")


@pytest.mark.parametrize("meta,needle", [
    ("{not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"format_version": FORMAT_VERSION}), "lacks ['model_fingerprint', 'config_fingerprint', "
                                                     "'model_config', 'data_fingerprint'"),
])
def test_bad_metadata(good, model, tmp_path, meta, needle):
    path = _copy(good, tmp_path)
    tensors, _ = _parts(path)
    _rewrite(path, tensors, meta)
    _refused(path, model, needle)


def test_bad_counts_in_metadata(good, model, tmp_path):
    path = _copy(good, tmp_path)
    tensors, meta = _parts(path)
    _rewrite(path, tensors, dict(meta, num_examples="3"))
    _refused(path, model, "num_examples='3'")
    _rewrite(path, tensors, dict(meta, num_responses=5))  # 6 responses stored
    _refused(path, model, "num_responses=5")


def test_file_without_digest_is_refused(good, model, tmp_path):
    """The digest is part of the format: a current-version file without it is damaged, not trusted."""
    path = _copy(good, tmp_path)
    tensors, meta = _parts(path)
    del meta["tensor_sha256"]
    _rewrite(path, tensors, meta)
    _refused(path, model, "lacks ['tensor_sha256']")


def test_older_format_is_refused_by_its_version(good, model, tmp_path):
    """A version-1 file (written before the config fingerprint; some also before the digest) cannot show
    which config its scores came from: both entry points refuse it, and the file is left as it was."""
    path = _copy(good, tmp_path)
    tensors, meta = _parts(path)
    old = {k: meta[k] for k in ("model_fingerprint", "data_fingerprint", "temperature", "model_class",
                                "model_config_name", "num_examples", "num_responses")}
    for extra in ({}, {"tensor_sha256": meta["tensor_sha256"]}):
        _rewrite(path, tensors, {**old, **extra, "format_version": 1})
        before = path.read_bytes()
        for load in (lambda: ReferenceCache.load(path, model=model, examples=EXAMPLES),
                     lambda: open_reference_cache(path, model, EXAMPLES, progress=False)):
            with pytest.raises(FingerprintMismatchError) as info:
                load()
            message = str(info.value)
            assert f"format version differs (stored 1, this pygpo reads {FORMAT_VERSION})" in message
            assert str(path) in message and "Delete the file" in message
        assert path.read_bytes() == before


def test_config_state_that_does_not_match_its_fingerprint(good, model, tmp_path):
    path = _copy(good, tmp_path)
    tensors, meta = _parts(path)
    meta["model_config"]["config"]["rms_norm_eps"] = 0.5  # edited without the fingerprint
    _rewrite(path, tensors, meta)
    _refused(path, model, "model_config does not match its config_fingerprint")
    _rewrite(path, tensors, dict(meta, model_config="llama"))
    _refused(path, model, "model_config does not match")


def test_digest_is_of_the_stored_tensors_and_delete_rebuilds(good, model, tmp_path):
    path = _copy(good, tmp_path)
    _, meta = _parts(path)
    assert len(meta["tensor_sha256"]) == 64 and int(meta["tensor_sha256"], 16) >= 0
    path.write_bytes(b"")
    _refused(path, model)
    path.unlink()  # the remedy the error names
    rebuilt = open_reference_cache(path, model, EXAMPLES, progress=False)
    # values against plain float64 logits of an unpadded forward
    tok, mask = rebuilt.token_logps([0])
    want = reference_token_logps(model, torch.tensor([[3, 4, 5, 6, 7]]))[0, 2:]
    torch.testing.assert_close(tok[0, 0, :2].double(), want, rtol=1e-6, atol=1e-6)
    assert mask[0, 0].tolist() == [True, True, False, False]

"""The integrations' less-travelled checks (each message names the argument and what was expected),
with real parts: a tiny random transformers model, real TRL configs, real files; and the reference
cache's and fingerprints' input checks."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from pygpo.fingerprint import fingerprint_examples
from pygpo.integrations import transformers as pt
from pygpo.integrations.hidden_states import LMHead, lm_head_of, unwrap_model
from pygpo.integrations.liger import LigerFusedLinearDPOLoss, LigerFusedLinearKTOLoss
from pygpo.ref_cache import ReferenceCache

from tiny_models import tiny_causal_lm

D, V = 8, 11


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("llama")


def test_lm_head_logprobs_temperature(model):
    head = lm_head_of(model)
    hidden = torch.randn(2, 3, model.config.hidden_size, dtype=torch.float64)
    with pytest.raises(ValueError, match="temperature must be positive, got 0"):
        head.logprobs(hidden, torch.zeros(2, 3, dtype=torch.long), temperature=0)


def test_lm_head_projection_folds_the_logit_scale():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(V, D, generator=g, dtype=torch.float64), torch.randn(V, generator=g, dtype=torch.float64)
    h = torch.randn(5, D, generator=g, dtype=torch.float64)
    for bias in (b, None):
        weight, scaled_bias = LMHead(w, bias, None, 0.25).projection()
        want = 0.25 * (h @ w.T + (0 if bias is None else bias))
        got = h @ weight.T + (0 if scaled_bias is None else scaled_bias)
        torch.testing.assert_close(got, want)


def test_unwrap_model_sees_through_torch_compile(model):
    assert unwrap_model(torch.compile(model)) is model  # wrapping only: nothing is compiled


def test_enable_prefix_sharing_backend(model):
    with pytest.raises(ValueError, match="backend must be 'auto', 'torch' or 'triton', got 'cuda'"):
        pt.enable_prefix_sharing(model, backend="cuda")
    assert pt.disable_prefix_sharing(model) is model  # never enabled: nothing to undo


def test_liger_target_and_reference_shapes():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(4, 3, D, generator=g), torch.randn(V, D, generator=g)
    y = torch.randint(0, V, (4, 3), generator=g)
    with pytest.raises(TypeError, match=r"target must be an integer tensor \(e.g. torch.long\), got torch.float32"):
        LigerFusedLinearDPOLoss(use_ref_model=False)(w, x, y.float())
    with pytest.raises(ValueError, match=r"ref_input must have _input's leading shape \(4, 3\), got \(4, 2, 8\)"):
        LigerFusedLinearDPOLoss()(w, x, y, ref_input=torch.randn(4, 2, D), ref_weight=w)
    with pytest.raises(TypeError, match="kl must be a real number or a tensor, got str"):
        LigerFusedLinearKTOLoss(use_ref_model=False)(x, w, y, preference_labels=torch.tensor([True, False, True, False]),
                                                     kl="a")


@pytest.mark.parametrize("overrides,reason", [
    (dict(loss_type=["a_future_loss"]), r"loss_type \['a_future_loss'\] has no fused mapping"),
    (dict(padding_free=True), "padding_free batches are not supported by the fused path"),
    (dict(precompute_ref_log_probs=True, ld_alpha=0.5), "precomputed reference scores with ld_alpha are already LD-weighted"),
    (dict(f_divergence_type="forward_kl", use_weighting=True), "f_divergence_type together with use_weighting"),
    (dict(loss_type=["sft"]), "loss_type 'sft' alone is reference-free"),
    (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0, -0.5]), "outside the range .*loss weight hinge=-0.5"),
    (dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.7), "outside the range .*fdpo.*alpha"),
])
def test_trl_configs_without_a_fused_mapping(tmp_path, overrides, reason):
    pytest.importorskip("trl")
    import trl_setup
    from pygpo.integrations.trl import fused_loss_for

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl_setup.config(tmp_path, **overrides)
    loss, why = fused_loss_for(args)
    assert loss is None
    assert re.search(reason, why), why


@pytest.mark.parametrize("overrides,divergence,alpha", [
    (dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.0), "forward_kl", None),
    (dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3), "alpha", 0.7),
    (dict(f_divergence_type="forward_kl", f_alpha_divergence_coef=1.0), "forward_kl", None),
])
def test_trl_f_divergences_map_onto_fdpo(tmp_path, overrides, divergence, alpha):
    """TRL's alpha coefficient c scores (exp((c-1)u) - 1)/(c-1): forward KL at c = 0, pygpo's alpha = 1 - c
    between; the coefficient means nothing for the other divergences."""
    pytest.importorskip("trl")
    import trl_setup
    from pygpo.integrations.trl import fused_loss_for

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl_setup.config(tmp_path, **overrides)
    loss, why = fused_loss_for(args)
    assert loss is not None, why
    assert loss.hparams["fdpo.divergence"] == divergence
    if alpha is not None:
        assert loss.hparams["fdpo.alpha"] == pytest.approx(alpha)


def test_reference_cache_path_type():
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        ReferenceCache.load(3)


def test_fingerprint_example_fields():
    with pytest.raises(TypeError, match=r"examples\[0\]\['prompt_ids'\] must be a sequence of token ids, got int"):
        fingerprint_examples([{"prompt_ids": 5, "chosen_ids": [1], "rejected_ids": [2]}])
    with pytest.raises(TypeError, match=r"examples\[0\]\['responses'\] must be a list of token-id lists, got str"):
        fingerprint_examples([{"prompt_ids": [5], "responses": "abc"}])
    with pytest.raises(TypeError, match="examples must be a sequence of dicts \\(one per example\\), got a single dict"):
        fingerprint_examples({"prompt_ids": [5], "responses": [[1]]})

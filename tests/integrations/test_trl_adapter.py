"""FusedDPOTrainer against TRL's own DPOTrainer: same losses, metrics and parameters after real training steps."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")

from pygpo import FusedPreferenceLoss  # noqa: E402
from pygpo.integrations.trl import FusedDPOTrainer, fused_loss_for  # noqa: E402

import trl_setup  # noqa: E402

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy")


def _train(cls, tmp_path, name, trainer_kwargs=None, *, ref_model=True, **overrides):
    model = trl_setup.model()
    kwargs = dict(model=model, args=trl_setup.config(tmp_path / name, **overrides),
                  train_dataset=trl_setup.dataset(), processing_class=trl_setup.tokenizer())
    # a reference that differs from the policy; without one, TRL's own choice (a copy, or the policy itself
    # for precomputed scores)
    kwargs["ref_model"] = trl_setup.model(seed=1) if ref_model else None
    trainer = cls(**kwargs, **(trainer_kwargs or {}))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, {n: p.detach().clone() for n, p in model.named_parameters()}, trainer


def _assert_same_run(logs, base_logs, params, base_params):
    """TRL's logged metrics and the trained parameters, step by step, within float32 tolerance."""
    for got, want in zip(logs, base_logs):
        for name in METRICS:
            if name in want:
                assert math.isclose(got[name], want[name], rel_tol=2e-4, abs_tol=2e-5), (name, got[name], want[name])
    for name, p in params.items():
        torch.testing.assert_close(p, base_params[name], rtol=2e-4, atol=2e-5, msg=name)


def _compare(tmp_path, fused_kwargs=None, *, ref_model=True, **overrides):
    base_logs, base_params, _ = _train(trl.DPOTrainer, tmp_path, "trl", ref_model=ref_model, **overrides)
    logs, params, trainer = _train(FusedDPOTrainer, tmp_path, "pygpo", trainer_kwargs=fused_kwargs, ref_model=ref_model,
                                   **overrides)
    if (fused_kwargs or {}).get("prefix_sharing"):
        assert trainer.model.config._attn_implementation == "pygpo_prefix"
    assert trainer.pygpo_loss is not None, trainer.pygpo_fallback_reason
    assert len(logs) == len(base_logs) == 3
    _assert_same_run(logs, base_logs, params, base_params)


@pytest.mark.parametrize("overrides", [
    {},
    {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
    {"loss_type": ["ipo"]},
    {"loss_type": ["robust"], "label_smoothing": 0.1},
    {"ld_alpha": 0.5},
    {"f_divergence_type": "js_divergence"},
    {"use_weighting": True},
    # keep_end at 4 tokens cuts some prompts away: the completion then starts at position 0, which no row
    # predicts, and TRL's length normalisation still counts it
    {"loss_type": ["ipo"], "truncation_mode": "keep_end", "max_length": 4},
    {"loss_type": ["sigmoid_norm"], "truncation_mode": "keep_end", "max_length": 4},
], ids=["sigmoid", "sigmoid+sft", "ipo", "robust", "ld", "js", "wpo", "ipo-prompt-cut", "sigmoid_norm-prompt-cut"])
def test_same_training_as_trl(tmp_path, overrides):
    _compare(tmp_path, **overrides)


@pytest.mark.parametrize("overrides", [{}, {"loss_type": ["ipo"]}], ids=["sigmoid", "ipo"])
def test_eager_gradients_train_like_trl(tmp_path, overrides):
    # memory_budget=1 byte of tile: one example per chunk, so the chunked pass is what is compared
    _compare(tmp_path, fused_kwargs={"eager_gradients": True, "memory_budget": 1}, **overrides)


def test_eager_gradients_run_an_sft_term_eagerly(tmp_path):
    """sigmoid + sft: the SFT term's token mean is fixed at each batch's mean chosen length, so the eager pass
    runs it (one example per chunk: a tiny tile budget) and gives TRL's results, with no fallback."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _compare(tmp_path, fused_kwargs={"eager_gradients": True, "memory_budget": 1}, loss_type=["sigmoid", "sft"],
                 loss_weights=[1.0, 0.5])
    assert not any("eager_gradients is off" in str(w.message) for w in caught)


def test_eager_gradients_fall_back_where_the_loss_is_not_separable(tmp_path, monkeypatch):
    """A loss the eager pass finds coupled across its chunks (here the SFT term without its fixed mean
    length): the first step finds it out, warns, and the run continues on the ordinary fused path with
    TRL's results."""
    monkeypatch.setattr(FusedPreferenceLoss, "_with_nll_mean_length", lambda self, inputs, layout: inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _compare(tmp_path, fused_kwargs={"eager_gradients": True, "memory_budget": 1}, loss_type=["sigmoid", "sft"],
                 loss_weights=[1.0, 0.5])
    assert any("eager_gradients is off" in str(w.message) for w in caught)


def test_precomputed_reference_scores(tmp_path):
    _compare(tmp_path, precompute_ref_log_probs=True)


def test_precomputed_reference_scores_of_the_policy_itself(tmp_path):
    """ref_model=None with precomputed scores: TRL scores the policy before training as the reference."""
    _compare(tmp_path, ref_model=False, precompute_ref_log_probs=True)


def test_prefix_sharing_trains_like_trl(tmp_path):
    _compare(tmp_path, fused_kwargs={"prefix_sharing": True})


def test_unsupported_options_fall_back_to_trl_with_a_warning(tmp_path):
    args = trl_setup.config(tmp_path / "x", loss_type=["hinge"], use_weighting=True)
    loss, reason = fused_loss_for(args)
    assert loss is None and "use_weighting" in reason
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = FusedDPOTrainer(model=trl_setup.model(), ref_model=trl_setup.model(seed=1), args=args,
                                  train_dataset=trl_setup.dataset(), processing_class=trl_setup.tokenizer())
    assert trainer.pygpo_loss is None
    assert any("TRL's own loss path" in str(w.message) for w in caught)


def test_length_normalisation_conflict_at_position_zero_warns(tmp_path):
    """ipo + sft on prompts cut away entirely: TRL's IPO counts the unscored position-0 token, its SFT does not;
    one set of lengths cannot serve both, so the run says so once."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(FusedDPOTrainer, tmp_path, "pygpo", loss_type=["ipo", "sft"], truncation_mode="keep_end", max_length=4)
    assert sum("completion starts at position 0" in str(w.message) for w in caught) == 1


def test_lora_training_with_the_adapters_off_reference_matches_trl(tmp_path):
    """TRL wraps the model with a LoRA config and scores the reference with the adapters disabled (no
    ref_model): the fused path takes the same reference and trains the same adapters."""
    peft = pytest.importorskip("peft")

    def run(cls, name, **kw):
        model = trl_setup.model()
        lora = peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                               lora_dropout=0.0, init_lora_weights=False)  # random B: the adapters act at step 0
        trainer = cls(model=model, args=trl_setup.config(tmp_path / name), train_dataset=trl_setup.dataset(),
                      processing_class=trl_setup.tokenizer(), peft_config=lora, **kw)
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
        return logs, params, trainer

    base_logs, base_params, _ = run(trl.DPOTrainer, "trl")
    logs, params, trainer = run(FusedDPOTrainer, "pygpo")
    assert trainer.pygpo_loss is not None, trainer.pygpo_fallback_reason
    assert params and params.keys() == base_params.keys()
    _assert_same_run(logs, base_logs, params, base_params)

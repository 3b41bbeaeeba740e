"""FusedCPOTrainer against TRL's own experimental CPOTrainer: same losses, metrics and parameters after real training
steps, for every loss type TRL 1.16 has."""

from __future__ import annotations

import pytest

trl = pytest.importorskip("trl")

import trl_pref_setup as setup  # noqa: E402  (silences TRL's experimental-import notice first)
import trl_setup  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402

from pygpo.integrations.trl_cpo import FusedCPOTrainer, fused_cpo_loss_for  # noqa: E402


def _compare(tmp_path, **kwargs):
    return setup.compare(CPOTrainer, FusedCPOTrainer, CPOConfig, tmp_path, **kwargs)


@pytest.mark.parametrize("overrides, keys", [
    ({"loss_type": "sigmoid", "label_smoothing": 0.1}, {"cpo"}),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, {"hinge", "sft"}),  # smoothing ignored, as TRL does
    ({"loss_type": "ipo", "cpo_alpha": 0.5}, {"ipo", "sft"}),
    ({"loss_type": "simpo", "label_smoothing": 0.1, "simpo_gamma": 0.8}, {"simpo", "sft"}),
    ({"loss_type": "alphapo", "alpha": 0.3}, {"alphapo"}),  # TRL: simpo with cpo_alpha = 0
], ids=["sigmoid", "hinge", "ipo", "simpo", "alphapo"])
def test_same_training_as_trl(tmp_path, overrides, keys):
    base_logs, trainer = _compare(tmp_path, **overrides)
    assert {spec.key for spec in trainer.pygpo_loss.specs} == keys
    nll = [h["nll_loss"] for h in base_logs]
    # the NLL term is live (a token mean over the batch's chosen tokens of varying lengths), except under AlphaPO
    assert nll == [0.0] * 3 if overrides["loss_type"] == "alphapo" else min(nll) > 1.0


def test_softcapped_tied_head_trains_like_trl(tmp_path):
    """Gemma-2: final logit softcapping (mean logits from a forward-only pass) and a tied lm_head."""
    _, trainer = _compare(tmp_path, make_model=setup.softcap_model, loss_type="simpo")
    assert trainer.pygpo_loss.options.softcap == 2.0


def test_unsupported_options_fall_back_to_trl_with_a_warning(tmp_path):
    """AlphaPO's reward shape with loss_type='sigmoid' (no registry key): TRL's loss path, with a warning."""
    trainer, messages = setup.compare_fallback(CPOTrainer, FusedCPOTrainer, CPOConfig, tmp_path, loss_type="sigmoid",
                                               alpha=0.2)
    assert trainer.pygpo_loss is None and "alpha" in trainer.pygpo_fallback_reason
    assert any("TRL's own loss path" in m and "alpha=0.2" in m for m in messages)


class _CountingFusedCPOTrainer(FusedCPOTrainer):
    """Counts the batches that ran the fused step."""

    fused_batches = 0

    def _pygpo_step(self, *args, **kwargs):
        type(self).fused_batches += 1
        return super()._pygpo_step(*args, **kwargs)


def test_batches_with_an_empty_completion_run_trls_path(tmp_path):
    """max_length = 7 truncates the completions after 7-word prompts to nothing: such batches (2 of 3) run TRL's
    path (warned once), the other one the fused path, and the run is TRL's."""
    _CountingFusedCPOTrainer.fused_batches = 0
    trainer, messages = setup.compare_fallback(CPOTrainer, _CountingFusedCPOTrainer, CPOConfig, tmp_path,
                                               loss_type="hinge", max_length=7)
    assert trainer.pygpo_loss is not None and _CountingFusedCPOTrainer.fused_batches == 1
    assert sum("no scored token" in m for m in messages) == 1


def test_option_mapping():
    args = lambda **kw: trl_setup.config("unused", config_cls=CPOConfig, **kw)  # noqa: E731
    loss, _ = fused_cpo_loss_for(args(beta=0.2, label_smoothing=0.1, cpo_alpha=0.7))
    assert loss.loss == {"cpo": 1.0} and loss.hparams == {"cpo.beta": 0.2, "cpo.eps": 0.1, "cpo.alpha": 0.7}
    loss, _ = fused_cpo_loss_for(args(loss_type="simpo", beta=2.0, simpo_gamma=0.4, cpo_alpha=0.0))
    assert loss.loss == {"simpo": 1.0} and loss.hparams == {"simpo.beta": 2.0, "simpo.gamma": 0.4, "simpo.eps": 0.0}
    loss, _ = fused_cpo_loss_for(args(loss_type="alphapo", alpha=-0.5, simpo_gamma=0.4))
    assert loss.loss == {"alphapo": 1.0} and loss.hparams == {"alphapo.beta": 0.3, "alphapo.gamma": 0.4,
                                                               "alphapo.a": -0.5}
    loss, _ = fused_cpo_loss_for(args(loss_type="ipo", cpo_alpha=2.0))
    assert loss.loss == {"ipo": 1.0, "sft": 1.0} and loss.hparams == {"ipo.beta": 0.3, "sft.alpha": 2.0}
    for overrides, word in [({"beta": 0.0}, "beta"), ({"label_smoothing": 0.6}, "eps"), ({"cpo_alpha": -1.0}, "alpha"),
                            ({"loss_type": "hinge", "alpha": 0.1}, "alpha=0.1"),
                            ({"loss_type": "simpo", "alpha": 0.1, "label_smoothing": 0.1}, "label_smoothing")]:
        loss, reason = fused_cpo_loss_for(args(**overrides))
        assert loss is None and word in reason, (overrides, reason)
    cfg = args()
    cfg.loss_type = "kto_pair"  # a loss type TRL might add (or removed): no mapping
    loss, reason = fused_cpo_loss_for(cfg)
    assert loss is None and "'kto_pair'" in reason


@pytest.mark.parametrize("options, word", [({"backend": "nope"}, "backend"), ({"memory_budget": -1}, "memory_budget")])
def test_bad_options_are_refused_before_any_work(tmp_path, options, word):
    # train_dataset=None: TRL's own __init__ would raise on it first, had it started
    with pytest.raises(ValueError, match=word):
        FusedCPOTrainer(model=setup.model(), args=trl_setup.config(tmp_path, config_cls=CPOConfig),
                        train_dataset=None, **options)


def test_encoder_decoder_model_falls_back_to_trl_with_a_warning(tmp_path):
    import transformers as tf

    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=len(trl_setup.WORDS) + 3, d_model=16, d_kv=4, d_ff=32,
                                                   num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1,
                                                   decoder_start_token_id=0))
    with pytest.warns(UserWarning, match="encoder-decoder models are not supported"):
        trainer = FusedCPOTrainer(model=t5, args=trl_setup.config(tmp_path, config_cls=CPOConfig,
                                                                  max_completion_length=8),
                                  train_dataset=trl_setup.dataset(n=4), processing_class=setup.tokenizer())
    assert trainer.pygpo_loss is None

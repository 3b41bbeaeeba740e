"""FusedKTOTrainer against TRL's own KTOTrainer: same losses, metrics and parameters after real training steps."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")

from pygpo.fused.scores import ProjectionOptions  # noqa: E402
from pygpo.integrations.trl_kto import FusedKTOTrainer, fused_kto_loss_for, row_mean_logit_sums  # noqa: E402

import trl_kto_setup  # noqa: E402
import trl_setup  # noqa: E402
from dist_utils import free_port, init_worker  # noqa: E402

METRICS = ("loss", "grad_norm", "kl", "entropy", "num_tokens", "logits/chosen", "logits/rejected", "rewards/chosen",
           "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


class _CountingFusedKTOTrainer(FusedKTOTrainer):
    """Counts the reference batches scored for precompute_ref_log_probs (TRL may reuse a cached file)."""

    ref_batches = 0

    def compute_ref_log_probs(self, model, inputs):
        type(self).ref_batches += 1
        return super().compute_ref_log_probs(model, inputs)


def _train(cls, tmp_path, name, *, ref_model=True, make_model=trl_kto_setup.model, trainer_kwargs=None, **overrides):
    model = make_model()
    kwargs = dict(model=model, args=trl_kto_setup.config(tmp_path / name, **overrides),
                  train_dataset=trl_kto_setup.dataset(), processing_class=trl_kto_setup.tokenizer())
    # a reference that differs from the policy; without one, TRL's own choice (the policy itself for precomputed
    # scores, the policy with its adapters off for PEFT)
    kwargs["ref_model"] = make_model(seed=1) if ref_model else None
    trainer = cls(**kwargs, **(trainer_kwargs or {}))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return logs, params, trainer


def _assert_same_run(logs, base_logs, params, base_params):
    """TRL's logged metrics (the same names) and the trained parameters, step by step, within float32 tolerance."""
    assert len(logs) == len(base_logs) == 3
    for got, want in zip(logs, base_logs):
        assert {m for m in METRICS if m in got} == {m for m in METRICS if m in want}
        assert "kl" in want and "logits/chosen" in want and "rewards/margins" in want
        for name in METRICS:
            if name in want:
                assert math.isclose(got[name], want[name], rel_tol=2e-4, abs_tol=2e-5), (name, got[name], want[name])
    assert params and params.keys() == base_params.keys()
    for name, p in params.items():
        torch.testing.assert_close(p, base_params[name], rtol=2e-4, atol=2e-5, msg=name)


def _compare(tmp_path, *, fused_cls=FusedKTOTrainer, **kw):
    base_logs, base_params, base = _train(trl.KTOTrainer, tmp_path, "trl", **kw)
    logs, params, trainer = _train(fused_cls, tmp_path, "pygpo", **kw)
    assert trainer.pygpo_loss is not None, trainer.pygpo_fallback_reason
    _assert_same_run(logs, base_logs, params, base_params)
    return base_logs, trainer, base


@pytest.mark.parametrize("overrides", [
    {"desirable_weight": 1.3, "undesirable_weight": 0.6},
    {"loss_type": "apo_zero_unpaired"},
], ids=["kto-weighted", "apo_zero_unpaired"])
def test_same_training_as_trl_with_a_reference_model(tmp_path, overrides):
    base_logs, trainer, base = _compare(tmp_path, **overrides)
    assert trainer.pygpo_loss.specs[0].key == trainer.args.loss_type
    kl = [h["kl"] for h in base_logs]
    # kto: the KL estimate is live (positive on some step); apo_zero_unpaired logs TRL's 0
    assert max(kl) > 0 if trainer.args.loss_type == "kto" else kl == [0.0] * 3
    # evaluation (no gradients, "eval_" names) on held-out rows, after training
    held_out = trl_kto_setup.dataset(n=8, seed=1)
    got, want = trainer.evaluate(held_out), base.evaluate(held_out)
    for name in METRICS:
        if f"eval_{name}" in want:
            assert math.isclose(got[f"eval_{name}"], want[f"eval_{name}"], rel_tol=2e-4, abs_tol=2e-5), name
    assert {k for k in got if "runtime" not in k and "per_second" not in k} == {
        k for k in want if "runtime" not in k and "per_second" not in k}


@pytest.mark.parametrize("overrides", [
    {},
    # weighted APO-zero runs as KTO with z0 = 0
    {"loss_type": "apo_zero_unpaired", "desirable_weight": 1.3, "undesirable_weight": 0.6},
], ids=["kto", "apo_zero_unpaired-weighted"])
def test_precomputed_reference_scores_of_the_policy_itself(tmp_path, overrides):
    """ref_model=None with precomputed scores: TRL scores the policy before training (and the KL completions)."""
    _CountingFusedKTOTrainer.ref_batches = 0
    _, trainer, _ = _compare(tmp_path, fused_cls=_CountingFusedKTOTrainer, ref_model=False,
                             precompute_ref_log_probs=True, **overrides)
    assert _CountingFusedKTOTrainer.ref_batches == 3  # 12 rows in batches of 4, scored by the fused pass
    assert trainer.pygpo_loss.specs[0].key == "kto"


def test_precomputed_reference_scores_of_a_reference_model(tmp_path):
    _compare(tmp_path, precompute_ref_log_probs=True)


def test_softcapped_tied_head_trains_like_trl(tmp_path):
    """Gemma-2: final logit softcapping (mean logits from a forward-only pass) and a tied lm_head."""
    _, trainer, _ = _compare(tmp_path, make_model=trl_kto_setup.softcap_model)
    assert trainer.pygpo_loss.options.softcap == 2.0


def test_lora_training_with_the_adapters_off_reference_matches_trl(tmp_path):
    """TRL wraps the model with a LoRA config and scores the reference with the adapters disabled."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                           lora_dropout=0.0, init_lora_weights=False)  # random B: the adapters act at step 0
    _compare(tmp_path, ref_model=False, trainer_kwargs={"peft_config": lora})


def test_unsupported_options_fall_back_to_trl_with_a_warning(tmp_path):
    """A negative undesirable weight (TRL runs it; outside the registry's range): TRL's loss path, with a warning."""
    overrides = {"undesirable_weight": -0.5}
    loss, reason = fused_kto_loss_for(trl_kto_setup.config(tmp_path / "x", **overrides))
    assert loss is None and "undesirable_weight" in reason
    base_logs, base_params, _ = _train(trl.KTOTrainer, tmp_path, "trl", **overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs, params, trainer = _train(FusedKTOTrainer, tmp_path, "pygpo", **overrides)
    assert trainer.pygpo_loss is None
    assert any("TRL's own loss path" in str(w.message) and "undesirable_weight" in str(w.message) for w in caught)
    _assert_same_run(logs, base_logs, params, base_params)


def test_option_mapping():
    args = lambda **kw: trl_kto_setup.config("unused", **kw)  # noqa: E731
    loss, _ = fused_kto_loss_for(args(beta=0.2, desirable_weight=2.0))
    assert loss.specs[0].key == "kto"
    assert loss.hparams == {"beta": 0.2, "desirable_weight": 2.0, "undesirable_weight": 1.0}
    loss, _ = fused_kto_loss_for(args(loss_type="apo_zero_unpaired", beta=0.2))
    assert loss.specs[0].key == "apo_zero_unpaired" and loss.hparams == {"beta": 0.2}
    cfg = args()
    cfg.loss_type = "bco"  # a loss type TRL might add: no mapping
    loss, reason = fused_kto_loss_for(cfg)
    assert loss is None and "'bco'" in reason
    loss, reason = fused_kto_loss_for(args(beta=0.0))
    assert loss is None and "beta" in reason


def test_bad_backend_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="backend"):
        FusedKTOTrainer(model=trl_kto_setup.model(), args=trl_kto_setup.config(tmp_path), backend="nope",
                        train_dataset=None)


@pytest.mark.parametrize("softcap", [None, 1.5])
def test_row_mean_logit_sums_against_float64_logits(softcap):
    g = torch.Generator().manual_seed(0)
    hidden, weight, bias = (torch.randn(3, 7, 16, generator=g), torch.randn(37, 16, generator=g),
                            torch.randn(37, generator=g))
    labels = torch.randint(0, 37, (3, 7), generator=g)
    labels[0, :3] = labels[2, 5:] = -100
    logits = hidden.double() @ weight.double().T + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    want = (logits.mean(-1) * (labels != -100)).sum(-1)
    opts = ProjectionOptions(softcap=softcap, backend="torch")
    got = row_mean_logit_sums(hidden, weight, bias, labels, opts=opts)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- DDP

WORLD = 2


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    init_worker(rank, port, WORLD)
    import trl_kto_setup as setup

    results = {}
    for cls in (trl.KTOTrainer, FusedKTOTrainer):
        model = setup.model()
        trainer = cls(model=model, ref_model=setup.model(seed=1),
                      args=setup.config(os.path.join(out_dir, cls.__name__), max_steps=2, per_device_train_batch_size=2,
                                        ddp_backend="gloo"),
                      train_dataset=setup.dataset(n=8), processing_class=setup.tokenizer())
        results[cls.__name__] = trl_setup.trained_record(trainer, model)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_gathers_the_kl_and_synchronises_gradients_as_trl(tmp_path):
    """2-process gloo DDP, each rank on its own shard: the reference point is the KL gathered over ranks (a
    rank-local one would change the loss), and gradients sync through DDP's forward (parameters stay identical
    across ranks and equal TRL's)."""
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for res in ranks:
        fused, base = res["FusedKTOTrainer"], res["KTOTrainer"]
        assert fused["fused"] and fused["wrapped"] == "DistributedDataParallel"
        for got, want in zip(fused["logs"], base["logs"]):
            for name in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "entropy", "grad_norm"):
                if name in want:
                    assert math.isclose(got[name], want[name], rel_tol=2e-4, abs_tol=2e-5), (name, got, want)
        assert any(h["kl"] > 0 for h in base["logs"])
        for name, p in fused["params"].items():
            torch.testing.assert_close(p, base["params"][name], rtol=2e-4, atol=2e-5, msg=name)
    for name, p in ranks[0]["FusedKTOTrainer"]["params"].items():
        torch.testing.assert_close(p, ranks[1]["FusedKTOTrainer"]["params"][name], rtol=0, atol=0, msg=name)

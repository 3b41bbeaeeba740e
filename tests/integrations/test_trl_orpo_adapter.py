"""FusedORPOTrainer against TRL's own experimental ORPOTrainer: same losses, metrics and parameters after real training
steps (TRL's NLL runs over the chosen rows' prompts too)."""

from __future__ import annotations

import math
import os

import pytest
import torch

trl = pytest.importorskip("trl")

import trl_pref_setup as setup  # noqa: E402  (silences TRL's experimental-import notice first)
import trl_setup  # noqa: E402
from dist_utils import free_port, init_worker  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

from pygpo.integrations.trl_orpo import FusedORPOTrainer, fused_orpo_loss_for  # noqa: E402


def _compare(tmp_path, **kwargs):
    return setup.compare(ORPOTrainer, FusedORPOTrainer, ORPOConfig, tmp_path, **kwargs)


@pytest.mark.parametrize("overrides", [{}, {"beta": 1.5, "padding_value": 7}], ids=["default", "padding_value"])
def test_same_training_as_trl(tmp_path, overrides):
    """padding_value pads the input ids of the concatenated batch: the padded positions' hidden states, and so
    TRL's logits/* (a mean over every position), depend on it."""
    base_logs, trainer = _compare(tmp_path, **overrides)
    assert trainer.pygpo_loss.specs[0].key == "orpo" and trainer.pygpo_loss.hparams == {"lam": trainer.args.beta}
    for h in base_logs:
        assert h["nll_loss"] > 1.0 and h["log_odds_ratio"] < 0 and "log_odds_chosen" in h


def test_softcapped_tied_head_trains_like_trl(tmp_path):
    """Gemma-2: final logit softcapping (also in the prompt tokens' cross-entropy) and a tied lm_head."""
    _, trainer = _compare(tmp_path, make_model=setup.softcap_model)
    assert trainer.pygpo_loss.options.softcap == 2.0


def test_lora_training_matches_trl(tmp_path):
    """TRL wraps the model with a LoRA config; the fused path runs the adapted body through the PEFT wrapper."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                           lora_dropout=0.0, init_lora_weights=False)  # random B: the adapters act at step 0
    _compare(tmp_path, trainer_kwargs={"peft_config": lora})


def test_unsupported_options_fall_back_to_trl_with_a_warning(tmp_path):
    """A negative beta (TRL runs it; outside the registry's range): TRL's loss path, with a warning."""
    trainer, messages = setup.compare_fallback(ORPOTrainer, FusedORPOTrainer, ORPOConfig, tmp_path, beta=-0.2)
    assert trainer.pygpo_loss is None and "lam" in trainer.pygpo_fallback_reason
    assert any("TRL's own loss path" in m and "lam" in m for m in messages)


def test_option_mapping_and_bad_options(tmp_path):
    loss, _ = fused_orpo_loss_for(trl_setup.config("unused", config_cls=ORPOConfig, beta=0.05), softcap=3.0)
    assert loss.loss == "orpo" and loss.hparams == {"lam": 0.05} and loss.options.softcap == 3.0
    # train_dataset=None: TRL's own __init__ would raise on it first, had it started
    with pytest.raises(ValueError, match="backend"):
        FusedORPOTrainer(model=setup.model(), args=trl_setup.config(tmp_path, config_cls=ORPOConfig),
                         train_dataset=None, backend="nope")


# ---------------------------------------------------------------------------------------------- DDP

WORLD = 2


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    init_worker(rank, port, WORLD)
    import trl_pref_setup as setup

    results = {}
    for cls in (ORPOTrainer, FusedORPOTrainer):
        model = setup.model()
        trainer = cls(model=model, processing_class=setup.tokenizer(), train_dataset=trl_setup.dataset(n=8),
                      args=trl_setup.config(os.path.join(out_dir, cls.__name__), config_cls=ORPOConfig, max_steps=2,
                                            per_device_train_batch_size=2, ddp_backend="gloo",
                                            gradient_checkpointing=False))
        results[cls.__name__] = trl_setup.trained_record(trainer, model)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_synchronises_gradients_and_gathers_metrics_as_trl(tmp_path):
    """2-process gloo DDP, each rank on its own shard: the NLL is each rank's token mean (as TRL's), gradients sync
    through DDP's forward (parameters identical across ranks and equal to TRL's), metrics are gathered alike."""
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for res in ranks:
        fused, base = res["FusedORPOTrainer"], res["ORPOTrainer"]
        assert fused["fused"] and fused["wrapped"] == "DistributedDataParallel"
        assert len(fused["logs"]) == len(base["logs"]) == 2
        for got, want in zip(fused["logs"], base["logs"]):
            assert set(got) == set(want)
            for name, value in want.items():
                assert math.isclose(got[name], value, **setup.TOL), (name, got[name], value)
        for name, p in fused["params"].items():
            torch.testing.assert_close(p, base["params"][name], rtol=2e-4, atol=2e-5, msg=name)
    for name, p in ranks[0]["FusedORPOTrainer"]["params"].items():
        torch.testing.assert_close(p, ranks[1]["FusedORPOTrainer"]["params"][name], rtol=0, atol=0, msg=name)

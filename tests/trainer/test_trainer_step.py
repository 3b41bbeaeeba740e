"""One optimizer step of `pygpo train` and what it promises: bf16 as mixed precision with float32 master
weights, stateful losses (statistics untouched by evaluation, one update per optimizer step, scheduled
hyper-parameters reaching them), the loss schedule's end point, the accumulated NLL term's weighting,
training reward accuracy with ties, and what a resumed run reports."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pygpo import FusedPreferenceLoss, preference_loss
from pygpo.trainer import load_config
from pygpo.trainer.data import BatchIterator
from pygpo.trainer.loop import Trainer, schedule_progress, train
from pygpo.trainer.models import reference_dtype
from pygpo.trainer.run_log import PLOTS
from pygpo.trainer.scoring import padded_rows

TINY = ["--demo_model.hidden_size", "32", "--demo_model.intermediate_size", "64", "--batch_size", "4",
        "--generate_eval_size", "0", "--eval_every", "0", "--log_every", "1", "--warmup_steps", "0",
        "--schedule", "constant"]
NUMBERS = ["52", "803416", "71", "942057", "38", "610294", "47", "285913", "19", "574630", "63", "918273"]


def _rows(path: Path, n: int, **columns) -> Path:
    """``n`` sorting rows of alternating short and long numbers (so micro-batches differ in chosen length),
    plus per-row ``columns`` (a function of the row index)."""
    rows = []
    for i in range(n):
        d = NUMBERS[i % len(NUMBERS)]
        rows.append({"prompt": f"sort {d}=", "chosen": "".join(sorted(d)), "rejected": "".join(sorted(d))[::-1],
                     **{k: f(i) for k, f in columns.items()}})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path: Path, *extra: str, rows: int = 12, **columns):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = _rows(tmp_path / "data.jsonl", rows, **columns)
    return load_config(None, [*TINY, "--dataset", str(data), "--eval_size", "4", "--output_dir", str(tmp_path / "run"),
                              *extra])


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


# -- dtype: bf16 = float32 master weights + autocast ----------------------------------------------------------


def test_bf16_keeps_float32_master_weights_and_moves_them_by_small_updates(tmp_path):
    """``dtype: bf16`` at the README's lr 5e-7: parameters, gradients and AdamW state stay float32, the forwards
    run their matmuls in bf16, and the first AdamW step moves every weight by ``-lr * g / (|g| + eps)``
    (bias-corrected moments m = g, v = g^2): an update far below bf16's resolution of the weights, which
    bf16 parameters would round away."""
    lr = 5e-7
    trainer = Trainer(_cfg(tmp_path, "--dtype", "bf16", "--lr", str(lr), "--max_grad_norm", "none"))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(p.dtype == torch.float32 for p in trainer.reference.parameters())  # the copy computes as the policy
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
             for m in (trainer.model.model.layers[0].mlp.down_proj, trainer.reference.model.layers[0].mlp.down_proj)]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    grads = {}
    trainer.optimizer.register_step_pre_hook(lambda *_: grads.update(
        {n: p.grad.detach().double().clone() for n, p in trainer.model.named_parameters()}))
    trainer.train_step()
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {torch.bfloat16}  # the policy's and the reference's matmuls ran in bf16
    assert all(g.dtype == torch.float64 for g in grads.values()) and len(grads) == len(before)
    for state in trainer.optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    eps = trainer.optimizer.defaults["eps"]
    moved = total = 0
    for name, p in trainer.model.named_parameters():
        g, w0 = grads[name], before[name].double()
        expected = w0 - lr * g / (g.abs() + eps)
        # float32 rounding of the updated weight: half an ulp of its magnitude
        tol = 0.5 * torch.finfo(torch.float32).eps * expected.abs() + 1e-12
        assert bool(((p.detach().double() - expected).abs() <= tol).all()), name
        moved += int((p.detach() != before[name]).sum())
        total += p.numel()
    assert moved / total > 0.5


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_checkpoint_holds_float32_weights_and_resumes_exactly(tmp_path, dtype):
    """A run's checkpoint stores the float32 master weights and optimizer state, bf16 runs included; resuming it
    in the same directory continues bit for bit, and the resumed run's summary keeps the initial evaluation
    (read back from metrics.jsonl)."""
    cfg = _cfg(tmp_path, "--dtype", dtype, "--max_steps", "2", "--save_every", "1")
    straight = train(cfg)
    assert straight["initial"]["eval/reward_accuracy"] == 0.5
    run = Path(cfg.output_dir)
    weights = load_file(str(run / "checkpoint-1" / "model.safetensors"))
    assert weights and all(t.dtype == torch.float32 for t in weights.values())
    state = torch.load(run / "checkpoint-1" / "trainer_state.pt", weights_only=True)
    assert all(s["exp_avg"].dtype == torch.float32 for s in state["optimizer"]["state"].values())
    final = load_file(str(run / "checkpoint-2" / "model.safetensors"))
    resumed = train(_cfg(tmp_path, "--dtype", dtype, "--max_steps", "2", "--save_every", "1",
                         "--resume", str(run / "checkpoint-1")))
    again = load_file(str(run / "checkpoint-2" / "model.safetensors"))
    for name in final:
        assert torch.equal(final[name], again[name]), name
    assert resumed["initial"] == straight["initial"] and resumed["final"] == straight["final"]


def test_reference_storage_dtype():
    """bf16 reference where it only scores (the cache's filler, another model); float32 where it must compute
    as the policy does: the initial copy, TR-DPO's moving reference, the token KL's one pass."""
    def dtype(*args):
        return reference_dtype(load_config(None, ["--output_dir", "unused", *args]))

    assert dtype() == torch.float32 and dtype("--reference", "cache") == torch.float32
    assert dtype("--dtype", "bf16") == torch.float32
    assert dtype("--dtype", "bf16", "--reference", "cache") == torch.bfloat16
    assert dtype("--dtype", "bf16", "--reference", "/models/ref") == torch.bfloat16
    assert dtype("--dtype", "bf16", "--reference", "/models/ref", "--sync_ref_every", "2") == torch.float32
    assert dtype("--dtype", "bf16", "--reference", "/models/ref", "--loss", "tdpo2") == torch.float32


# -- stateful losses --------------------------------------------------------------------------------------------


GROUPS = {"groups": lambda i: i % 2}


@pytest.mark.parametrize("loss, extra, columns", [
    ("beta_dpo", [], {}),
    ("bco", [], {}),
    ("group_robust", ["--loss_args.num_groups", "2"], GROUPS),
], ids=["beta_dpo", "bco", "group_robust"])
def test_evaluation_leaves_stateful_statistics_and_modes_alone(tmp_path, loss, extra, columns):
    """After a training step (the policy has moved, so held-out margins and group losses differ from the
    training ones), evaluate() changes no statistic and leaves model and loss in training mode."""
    trainer = Trainer(_cfg(tmp_path, "--loss", loss, *extra, **columns))
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.loss_fn.state_dict().items()}
    assert before
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval/loss"])
    after = trainer.loss_fn.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert trainer.model.training and trainer.loss_fn.training and trainer.loss_fn.state_loss.training


def test_stateful_statistics_update_once_per_optimizer_step(tmp_path):
    """grad_accum 2: BCO's running mean counts the responses of one micro-batch per step (2 steps x 4 pairs x 2
    responses), beta-DPO's EMA counts one update per step."""
    bco = Trainer(_cfg(tmp_path / "bco", "--loss", "bco", "--grad_accum", "2"))
    beta = Trainer(_cfg(tmp_path / "beta", "--loss", "beta_dpo", "--grad_accum", "2"))
    for t in (bco, beta):
        t.train_step()
        t.train_step()
    assert float(bco.loss_fn.state_loss.count) == 2 * 4 * 2
    assert int(beta.loss_fn.state_loss.steps) == 2
    assert bco.loss_fn.training and beta.loss_fn.training


def test_set_hparams_reaches_the_stateful_module_and_keeps_its_statistics():
    loss = FusedPreferenceLoss("beta_dpo", beta=0.1)
    loss.state_loss.m0.fill_(0.25)
    loss.set_hparams(beta=0.3)
    assert loss.hparams == {"beta": 0.3} and loss.state_loss.beta == 0.3
    assert float(loss.state_loss.m0) == 0.25
    with pytest.raises(ValueError, match=r"beta=-1 is out of range"):
        loss.set_hparams(beta=-1)
    with pytest.raises(ValueError, match=r"unexpected option\(s\) 'lam'"):
        loss.set_hparams(lam=0.5)
    assert loss.hparams == {"beta": 0.3} and loss.state_loss.beta == 0.3  # unchanged by the refused calls
    robust = FusedPreferenceLoss("group_robust", num_groups=2)
    with pytest.raises(ValueError, match="change the shape of GroupRobustLoss's statistics"):
        robust.set_hparams(num_groups=3)
    combined = FusedPreferenceLoss("dpo+sft", **{"sft.alpha": 1.0})
    combined.set_hparams(**{"sft.alpha": 0.5})
    assert combined.hparams == {"sft.alpha": 0.5}
    with pytest.raises(ValueError, match="is not finite"):
        combined.set_hparams(**{"sft.alpha": float("nan")})
    assert combined.hparams == {"sft.alpha": 0.5}


def test_loss_schedule_reaches_stateful_losses_and_its_end_on_the_last_step(tmp_path):
    """beta 0.1 -> 0.5 over 3 steps: 0.1, 0.3, 0.5 in the stateful module that computes the loss; DPO-Shift's
    lam 1.0 -> 0.8 likewise ends at 0.8 on the last step. The LR schedule is unchanged."""
    sched = ["--loss_schedule.beta.start", "0.1", "--loss_schedule.beta.end", "0.5"]
    trainer = Trainer(_cfg(tmp_path / "beta", "--loss", "beta_dpo", "--max_steps", "3", *sched))
    used = []
    for _ in range(3):
        trainer.train_step()
        used.append((trainer.loss_fn.hparams["beta"], trainer.loss_fn.state_loss.beta))
    assert used == [pytest.approx((b, b)) for b in (0.1, 0.3, 0.5)]
    shift = Trainer(_cfg(tmp_path / "shift", "--loss", "dpo_shift", "--max_steps", "3", "--loss_schedule.lam.start",
                         "1.0", "--loss_schedule.lam.end", "0.8", "--schedule", "linear"))
    lams, lrs = [], []
    for _ in range(3):
        lrs.append(shift.train_step()["lr"])
        lams.append(shift.loss_fn.hparams["lam"])
    assert lams == pytest.approx([1.0, 0.9, 0.8])
    assert lrs == pytest.approx([3e-3 * (1 - s / 3) for s in (1, 2, 3)])  # linear decay to 0 after the last step
    assert (schedule_progress(0, 1), schedule_progress(0, 5), schedule_progress(4, 5)) == (0.0, 0.0, 1.0)


# -- accumulation, reward accuracy, margins ------------------------------------------------------------------


def _sums(model, examples, pad_id):
    rows = padded_rows(examples, pad_id, torch.device("cpu"))
    logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits[:, :-1].double()
    lp = torch.log_softmax(logits, -1).gather(-1, rows["labels"].clamp(min=0)[..., None])[..., 0]
    mask = rows["labels"] != -100
    sums, lengths = torch.where(mask, lp, torch.zeros((), dtype=lp.dtype)).sum(-1), mask.sum(-1).double()
    b = len(examples)
    return torch.stack([sums[:b], sums[b:]], 1), torch.stack([lengths[:b], lengths[b:]], 1)


def test_accumulated_nll_term_is_the_token_mean_over_the_whole_step(tmp_path):
    """dpo+sft with 2 micro-batches of 2 pairs of different chosen lengths: the step's loss is the loss of all 4
    pairs at once (the NLL a token mean over every chosen token of the step), not the mean of the micro-batches'
    own losses. Reference: float64 sums from plain logits and the registry loss."""
    trainer = Trainer(_cfg(tmp_path, "--loss", "dpo+sft", "--batch_size", "2", "--grad_accum", "2"))
    model = copy.deepcopy(trainer.model).double()
    from pygpo.integrations.transformers import disable_prefix_sharing

    disable_prefix_sharing(model)
    order = BatchIterator(trainer.train_set, 2, seed=trainer.cfg.seed)
    micro = [order.next_batch(), order.next_batch()]
    with torch.no_grad():
        scored = [_sums(model, mb, trainer.pad_id) for mb in micro]

    def loss(parts):
        policy, lengths = (torch.cat(x) for x in zip(*parts))
        return float(preference_loss("dpo+sft", policy, policy, lengths=lengths).loss)  # step 0: reference = policy

    whole_step = loss(scored)
    per_micro = 0.5 * (loss(scored[:1]) + loss(scored[1:]))
    assert abs(per_micro - whole_step) > 1e-4 * abs(whole_step)  # the data tells the two weightings apart
    assert trainer.train_step()["loss"] == pytest.approx(whole_step, rel=1e-5)


def test_training_accuracy_counts_ties_and_margins_plot_like_with_like(tmp_path):
    """Step 1 (policy = reference: every margin ties) logs rewards/accuracies 0.5, as eval/reward_accuracy reads
    at step 0; the held-out eval/rewards/margins is the loss's beta * h, the training metric's definition
    (DPO, beta 0.2), next to which margins.png plots it."""
    summary = train(_cfg(tmp_path, "--max_steps", "2", "--loss_args.beta", "0.2"))
    records = _records(tmp_path / "run")
    steps = {r["step"]: r for r in records if "loss" in r}
    assert steps[1]["rewards/accuracies"] == 0.5 and summary["initial"]["eval/reward_accuracy"] == 0.5
    final = [r for r in records if "eval/loss" in r][-1]
    assert final["eval/margin"] != 0.0
    assert final["eval/rewards/margins"] == pytest.approx(0.2 * final["eval/margin"], rel=1e-5)
    assert PLOTS["margins.png"] == ("rewards/margins", "eval/rewards/margins")
    assert (tmp_path / "run" / "margins.png").is_file()

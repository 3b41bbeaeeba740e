"""`pygpo train` end to end for its inputs: per-example loss columns refused at load, the reducer option
reaching the loss, the data report, the recipe a resume must match, options that would otherwise be
accepted and then ignored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pygpo.__main__ import main as cli
from pygpo.trainer import load_config
from pygpo.trainer.checkpoint import ResumeError
from pygpo.trainer.loop import Trainer, train
from pygpo.trainer.scoring import score_batch

TINY = ["--demo_model.hidden_size", "32", "--demo_model.intermediate_size", "64", "--demo_model.num_hidden_layers", "1",
        "--batch_size", "4", "--generate_eval_size", "0", "--eval_every", "0", "--log_every", "1"]
DIGITS = ["5291", "8034", "7163", "9420", "3857", "6102", "41", "730915"]


def _cfg(out: Path, *extra: str):
    return load_config(None, [*TINY, "--output_dir", str(out), *extra])


def _rows(path: Path, n: int, **columns) -> Path:
    """``n`` sorting pairs of varied lengths as JSONL; ``columns[name](i)`` adds a column."""
    rows = []
    for i in range(n):
        d = DIGITS[i % len(DIGITS)]
        row = {"prompt": f"sort {d}=", "chosen": "".join(sorted(d)), "rejected": d[::-1] + "0" * (i % 3)}
        row.update({name: make(i) for name, make in columns.items()})
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli_error(capsys, *args: str) -> str:
    assert cli(["train", *TINY, "--max_steps", "1", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pygpo train: ") and "Traceback" not in err and "\n" not in err
    return err


# -- per-example loss inputs ------------------------------------------------------------------------------


def test_a_bad_loss_input_row_stops_the_run_before_any_compute(tmp_path, capsys):
    """ODPO's scores as a number in one row: exit 2 naming file, row and column, before a model is built
    or the run directory is written."""
    data = _rows(tmp_path / "odpo.jsonl", 12, scores=lambda i: 3.0 if i == 5 else [2.0, 1.0])
    out = tmp_path / "run"
    err = _cli_error(capsys, "--dataset", str(data), "--loss", "odpo", "--eval_size", "4", "--output_dir", str(out))
    assert str(data) in err and "row 5 (0-based)" in err and "field 'scores'" in err
    assert not out.exists()
    summary = train(_cfg(out, "--dataset", str(data), "--loss", "odpo", "--eval_size", "4", "--max_steps", "1",
                         "--skip_bad_rows"))
    assert summary["data"]["train"]["skipped"] == {"wrong_shape": 1}


# -- options refused before anything runs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--loss", "ld"], "--reducer ld"),
        (["--reducer", "weighted"], "reducer: 'weighted'"),
        (["--demo_model.hidden_size", "30"], "demo_model.hidden_size"),
        (["--loss", "simpo", "--sync_ref_every", "2"], "sync_ref_every"),
        (["--loss", "dpo+sft", "--loss_schedule.dpo.beta.start", "0.1", "--loss_schedule.dpo.beta.end", "-1"],
         "loss_schedule.dpo.beta.end"),
    ],
)
def test_config_refusals_are_one_line_exit_2(tmp_path, capsys, args, needle):
    assert needle in _cli_error(capsys, *args, "--output_dir", str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_eval_fraction_zero_with_the_demo_dataset_skips_evaluation(tmp_path):
    summary = train(_cfg(tmp_path, "--eval_fraction", "0", "--max_steps", "1"))
    assert summary["final"] == {} and "evaluation skipped" in summary["evaluation"] and "initial" not in summary


# -- the reducer reaches the loss (needs Trainer to pass cfg.fused_loss_options()) ------------------------------


def _token_logps(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Independent reference: float64 log-probs of ``response``'s tokens after ``prompt``, from the full logits."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def _reduced(model, ex, reducer: str, alpha: float) -> list[float]:
    """LOSSES.md section 1: mean = sum_t lp_t / |y|; ld = sum_{k<=l_p} lp_k + alpha sum_{k>l_p} lp_k."""
    toks = [_token_logps(model, ex["prompt_ids"], ex[key]) for key in ("chosen_ids", "rejected_ids")]
    if reducer == "mean":
        return [float(t.mean()) for t in toks]
    l_p = min(len(t) for t in toks)
    return [float(t[:l_p].sum() + alpha * t[l_p:].sum()) for t in toks]


@pytest.mark.parametrize("reducer,args,alpha", [("mean", "{}", 1.0), ("ld", "{alpha: 0.25}", 0.25)])
@pytest.mark.parametrize("prefix", ["true", "false"])
def test_the_reducer_option_shapes_the_trainers_scores(tmp_path, reducer, args, alpha, prefix):
    data = _rows(tmp_path / "d.jsonl", 8)
    trainer = Trainer(_cfg(tmp_path, "--dataset", str(data), "--eval_size", "4", "--reducer", reducer,
                           "--reducer_args", args, "--prefix_sharing", prefix))
    assert trainer.loss_fn.reducer == reducer
    examples = trainer.train_set[:4]
    assert len({len(e["chosen_ids"]) - len(e["rejected_ids"]) for e in examples}) > 1  # ld's l_p matters
    out = score_batch(trainer.loss_fn, trainer.model, trainer.reference, examples, prefix_sharing=prefix == "true",
                      pad_id=trainer.pad_id, device=torch.device("cpu"))
    expected = torch.tensor([_reduced(trainer.model, ex, reducer, alpha) for ex in examples], dtype=torch.float64)
    torch.testing.assert_close(out.policy_logps.double(), expected, rtol=1e-5, atol=1e-5)


# -- the data report (needs the startup print and _print_summary to show describe_data) ------------------------


def test_data_summary_is_printed_at_startup_and_in_the_final_summary(tmp_path, capsys):
    data = _rows(tmp_path / "d.jsonl", 10)
    data.write_text(data.read_text() + '{"prompt": "sort 12=", "chosen": "12"}\n')
    assert cli(["train", *TINY, "--dataset", str(data), "--eval_size", "2", "--skip_bad_rows", "--max_steps", "1",
                "--max_prompt_length", "4", "--max_length", "12", "--output_dir", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    line = f"data train: {data}: 11 rows, 10 kept, skipped 1 (missing_field: 1); truncated prompts 10, responses"
    assert printed.count(line) == 2, printed  # at startup and in the final summary
    assert "data pairs: train 8, held-out 2" in printed


# -- the recipe a resume must match --------------------------------------------------------------------------


def test_resume_refuses_another_dtype_or_hyper_parameter(tmp_path):
    run = tmp_path / "run"
    data = _rows(tmp_path / "d.jsonl", 8)
    common = ["--dataset", str(data), "--eval_size", "4"]
    train(_cfg(run, *common, "--max_steps", "1"))
    ckpt = str(run / "checkpoint-1")
    for extra, needle in ((["--loss_args.beta", "0.2"], "dpo.beta: 0.1 -> 0.2"), (["--dtype", "bf16"], "'fp32' -> 'bf16'")):
        with pytest.raises(ResumeError, match=needle):
            Trainer(_cfg(run, *common, "--max_steps", "2", "--resume", ckpt, *extra)).run()
    assert Trainer(_cfg(run, *common, "--max_steps", "2", "--resume", ckpt, "--loss_args.beta", "0.1")).run()["step"] == 2


def test_resume_refuses_another_schedule(tmp_path):
    """Needs Trainer to record cfg.loss_schedule (loss_identity(..., schedule=cfg.loss_schedule))."""
    run = tmp_path / "run"
    data = _rows(tmp_path / "d.jsonl", 8)
    common = ["--dataset", str(data), "--eval_size", "4", "--loss", "dpo_shift", "--loss_schedule.lam.start", "1.0"]
    train(_cfg(run, *common, "--loss_schedule.lam.end", "0.8", "--max_steps", "1"))
    with pytest.raises(ResumeError, match=r"loss_schedule.lam.end: 0.8 -> 0.5"):
        Trainer(_cfg(run, *common, "--loss_schedule.lam.end", "0.5", "--max_steps", "2",
                     "--resume", str(run / "checkpoint-1"))).run()

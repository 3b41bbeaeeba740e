"""`pygpo train` under interruption and bad input: exact resume after Ctrl-C at any point of a step, no
held-out set, clear one-line errors (exit 2) for the user's mistakes, refused resumes, the periodic log line."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pygpo.__main__ import is_user_error
from pygpo.__main__ import main as cli
from pygpo.trainer import load_config
from pygpo.trainer.checkpoint import ResumeError
from pygpo.trainer.data import train_eval_split
from pygpo.trainer.loop import Trainer, check_device, train

TINY = ["--demo_model.hidden_size", "32", "--demo_model.intermediate_size", "64", "--batch_size", "4",
        "--generate_eval_size", "0", "--eval_every", "0", "--log_every", "1"]


def _cfg(out: Path, *extra: str):
    return load_config(None, [*TINY, "--output_dir", str(out), *extra])


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _rows(path: Path, n: int) -> Path:
    """A JSONL file of ``n`` demo-like preference rows."""
    digits = ["5291", "8034", "7163", "9420", "3857", "6102"]
    rows = [{"prompt": f"sort {d}=", "chosen": "".join(sorted(d)), "rejected": "".join(sorted(d))[::-1]}
            for d in (digits[i % len(digits)] for i in range(n))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _interrupt_after_update(trainer: Trainer, call: int, *, times: int = 1) -> None:
    """Deliver SIGINT ``times`` times at the end of the ``call``-th ``optimizer.zero_grad()`` (which follows the
    optimizer and LR updates): the weights are updated but the step counter is not, the worst moment for a
    checkpoint."""
    real, calls = trainer.optimizer.zero_grad, [0]

    def step(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == call:
            for _ in range(times):
                signal.raise_signal(signal.SIGINT)
        return out

    trainer.optimizer.zero_grad = step


# -- 1. Ctrl-C -----------------------------------------------------------------------------------------


def test_ctrl_c_mid_step_then_resume_matches_the_uninterrupted_run(tmp_path):
    """SIGINT after the 3rd optimizer update: the step finishes, the checkpoint describes step 3 (data position
    included), and the resumed run's losses (across an epoch's end) and final weights equal the uninterrupted run's."""
    data = ["--dataset", str(_rows(tmp_path / "data.jsonl", 14)), "--eval_size", "4", "--max_steps", "6"]
    train(_cfg(tmp_path / "straight", *data))
    cut = Trainer(_cfg(tmp_path / "cut", *data))
    _interrupt_after_update(cut, 3)
    before = signal.getsignal(signal.SIGINT)
    summary = cut.run()
    assert signal.getsignal(signal.SIGINT) is before  # the loop's handler is gone again
    assert summary["interrupted"] and summary["step"] == 3
    state = json.loads((tmp_path / "cut" / "checkpoint-3" / "state.json").read_text())
    assert state["tag"] == "interrupted" and state["step"] == 3
    assert (state["data"]["epoch"], state["data"]["position"]) == (0, 10)  # batches of 4, 4, 2: epoch 0 done
    resumed = train(_cfg(tmp_path / "cut", *data, "--resume", "latest"))
    assert resumed["step"] == 6
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "cut")
    assert sorted(b) == list(range(1, 7))
    for step in range(1, 7):
        assert b[step] == pytest.approx(a[step], abs=1e-7), step
    wa, wb = (load_file(str(tmp_path / d / "checkpoint-6" / "model.safetensors")) for d in ("straight", "cut"))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-7, msg=name)


def test_second_ctrl_c_aborts_without_a_checkpoint(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "--max_steps", "4"))
    _interrupt_after_update(trainer, 2, times=2)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert signal.getsignal(signal.SIGINT) is before
    assert not list(tmp_path.glob("checkpoint-*"))


def test_ctrl_c_during_the_final_evaluation_keeps_the_final_checkpoint(tmp_path):
    """The last step is done and its checkpoint written before the final evaluation; a Ctrl-C during that
    evaluation is deferred (it finishes, the summary is written) instead of killing the run."""
    trainer = Trainer(_cfg(tmp_path, "--max_steps", "2", "--eval_size", "4"))
    real, calls = trainer.evaluate, [0]

    def evaluate():
        calls[0] += 1
        if calls[0] == 2:  # the first call is the initial evaluation, the second the final one
            assert (tmp_path / "checkpoint-2" / "state.json").is_file()  # saved before it
            signal.raise_signal(signal.SIGINT)
        return real()

    trainer.evaluate = evaluate
    before = signal.getsignal(signal.SIGINT)
    summary = trainer.run()
    assert signal.getsignal(signal.SIGINT) is before
    assert calls[0] == 2 and summary["step"] == 2 and "interrupted" not in summary
    assert summary["final"] and json.loads((tmp_path / "summary.json").read_text())["step"] == 2
    assert json.loads((tmp_path / "checkpoint-2" / "state.json").read_text())["tag"] == "final"


# -- 2. no held-out set --------------------------------------------------------------------------------


def test_eval_fraction_zero_trains_without_evaluation(tmp_path, capsys):
    data = _rows(tmp_path / "data.jsonl", 8)
    out = tmp_path / "run"
    assert cli(["train", *TINY, "--dataset", str(data), "--eval_fraction", "0", "--max_steps", "2",
                "--output_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 2 and summary["final"] == {} and "initial" not in summary
    assert "evaluation skipped" in summary["evaluation"]
    assert capsys.readouterr().out.count("evaluation skipped") == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and not any(k.startswith("eval/") for r in records for k in r)


# -- 3, 4, 6, 7. one-line errors, exit 2 -------------------------------------------------------------------


def _cli_error(capsys, *args: str) -> str:
    assert cli(["train", *TINY, "--max_steps", "1", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pygpo train: ") and "Traceback" not in err
    return err


def test_user_errors_after_config_parsing_exit_2_with_one_line(tmp_path, capsys):
    out = ["--output_dir", str(tmp_path / "run")]
    err = _cli_error(capsys, "--dataset", str(tmp_path / "nope.jsonl"), *out)
    assert "dataset: no such file or directory" in err and "nope.jsonl" in err
    (tmp_path / "empty.jsonl").write_text("")
    assert "no usable rows" in _cli_error(capsys, "--dataset", str(tmp_path / "empty.jsonl"), *out)
    bad = _rows(tmp_path / "bad.jsonl", 4)
    bad.write_text(bad.read_text() + '{"prompt": "sort 12=", "chosen": "12"}\n')
    err = _cli_error(capsys, "--dataset", str(bad), *out)
    assert "row 4" in err and "'rejected'" in err
    err = _cli_error(capsys, "--resume", str(tmp_path / "no_checkpoint"), *out)
    assert "resume:" in err and "no_checkpoint" in err


def test_missing_train_extra_is_named_before_anything_runs(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert cli(["train", *TINY, "--max_steps", "1", "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "pygpo train: needs matplotlib, which this environment lacks: pip install 'pygpo[train]'"
    assert not (tmp_path / "run").exists()


def test_wrong_model_or_tokenizer_path_names_the_option(tmp_path, capsys):
    err = _cli_error(capsys, "--model", str(tmp_path / "no_model"), "--output_dir", str(tmp_path / "run"))
    assert "model: " in err and "not a local Hugging Face model directory" in err and "no such directory" in err
    assert "repo" not in err.lower()  # not taken for a Hub repo id
    err = _cli_error(capsys, "--tokenizer", str(tmp_path / "no_tok"), "--output_dir", str(tmp_path / "run"))
    assert err.startswith("pygpo train: tokenizer: ") and "no_tok" in err and "no such directory" in err


def test_one_row_dataset_names_size_and_eval_fraction(tmp_path, capsys):
    data = _rows(tmp_path / "one.jsonl", 1)
    err = _cli_error(capsys, "--dataset", str(data), "--output_dir", str(tmp_path / "run"))
    assert "eval_fraction: 0.05" in err and "1 usable example" in err and "eval_fraction 0" in err
    with pytest.raises(ValueError, match=r"eval_size: expected 0 <= eval_size < 3 \(the dataset has 3"):
        train_eval_split([{}] * 3, seed=0, eval_size=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of CUDA on a torch without it")
def test_cuda_device_without_cuda_is_refused_up_front(tmp_path, capsys):
    err = _cli_error(capsys, "--device", "cuda", "--output_dir", str(tmp_path / "run"))
    assert "device: 'cuda' requested" in err and "--device cpu" in err
    with pytest.raises(ValueError, match="device: 'cuda:1' requested"):
        check_device("cuda:1")
    check_device("cpu")  # no error


def _raise_outside_pygpo():
    raise ValueError("a bug in someone else's code")


def test_only_pygpos_own_errors_lose_their_traceback():
    with pytest.raises(ValueError) as ours:
        train_eval_split([{}], seed=0, eval_size=1)
    assert is_user_error(ours.value)
    with pytest.raises(ValueError) as theirs:
        _raise_outside_pygpo()
    assert not is_user_error(theirs.value)
    with pytest.raises(RuntimeError) as bug:
        torch.zeros(2) @ torch.zeros(3)
    assert not is_user_error(bug.value)


# -- 5. refused resumes ----------------------------------------------------------------------------------


def test_resume_refuses_another_loss_and_damaged_files(tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg(run, "--max_steps", "1"))
    ckpt = run / "checkpoint-1"
    written = (run / "config.yaml").read_text()
    with pytest.raises(ResumeError, match=r"written with loss 'dpo', but this run has loss 'beta_dpo'; resume with --loss dpo"):
        Trainer(_cfg(run, "--max_steps", "2", "--loss", "beta_dpo", "--resume", str(ckpt))).run()
    assert (run / "config.yaml").read_text() == written  # the refused run left the original run's config
    err = _cli_error(capsys, "--output_dir", str(run), "--loss", "beta_dpo", "--resume", str(ckpt))
    assert "--loss dpo" in err
    for name in ("model.safetensors", "trainer_state.pt", "state.json"):
        damaged = tmp_path / f"damaged_{name}" / "checkpoint-1"
        damaged.parent.mkdir()
        for f in ckpt.iterdir():
            (damaged / f.name).parent.mkdir(exist_ok=True)
            (damaged / f.name).write_bytes(f.read_bytes()[: 100] if f.name == name else f.read_bytes())
        with pytest.raises(ResumeError, match=rf"cannot read .*{name}.*damaged or incomplete"):
            Trainer(_cfg(run, "--max_steps", "2", "--resume", str(damaged))).run()


# -- 8. the periodic log line ------------------------------------------------------------------------------


def test_log_every_prints_a_metrics_line(tmp_path, capsys):
    assert cli(["train", *TINY, "--max_steps", "4", "--log_every", "2", "--output_dir", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4"]
    logged = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert f"loss {logged[2]['loss']:.4f}" in lines[0] and "lr " in lines[0]


def test_backend_override_that_cannot_run_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYGPO_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors: triton cannot run them
    err = _cli_error(capsys, "--output_dir", str(tmp_path / "run"))
    assert "PYGPO_BACKEND='triton' runs on CUDA tensors" in err and "PYGPO_BACKEND=torch" in err

"""The training loop end to end: the demo learns, outputs, exact resume, accumulation, schedules, errors."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from pygpo.__main__ import main as cli
from pygpo.trainer import load_config
from pygpo.trainer.checkpoint import ResumeError
from pygpo.trainer.loop import Trainer, train
from pygpo.trainer.models import ModelPathError

SMALL = ["--demo_model.hidden_size", "32", "--demo_model.intermediate_size", "64", "--batch_size", "8",
         "--generate_eval_size", "16", "--eval_every", "0", "--log_every", "1", "--max_new_tokens", "6"]


def _cfg(tmp_path, *extra: str):
    return load_config(None, [*SMALL, "--output_dir", str(tmp_path), *extra])


def _params(path):
    return load_file(str(path / "model.safetensors"))


def test_demo_learns_the_task(tmp_path, capsys):
    """The default demo (no arguments but the output folder): held-out reward accuracy from 0.5 to >= 0.9
    and a greedy-decoding accuracy that improves, both printed and saved."""
    assert cli(["train", "--output_dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    first, final = summary["initial"], summary["final"]
    assert first["eval/reward_accuracy"] == pytest.approx(0.5)
    assert final["eval/reward_accuracy"] >= 0.9
    assert final["eval/greedy_accuracy"] > first["eval/greedy_accuracy"] + 0.3
    printed = capsys.readouterr().out
    assert "eval/reward_accuracy: 0.500 ->" in printed and "eval/greedy_accuracy" in printed
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "reward_accuracy.png", "margins.png"):
        assert (tmp_path / name).is_file(), name
    ckpt = tmp_path / "checkpoint-200"
    assert {p.name for p in ckpt.iterdir()} >= {"model.safetensors", "trainer_state.pt", "state.json"}
    assert load_config(tmp_path / "config.yaml").to_dict() == load_config(None, ["--output_dir", str(tmp_path)]).to_dict()


def test_resume_continues_exactly(tmp_path):
    straight = train(_cfg(tmp_path / "a", "--max_steps", "6", "--save_every", "3"))
    assert straight["step"] == 6
    cfg = _cfg(tmp_path / "a", "--max_steps", "6", "--resume", str(tmp_path / "a" / "checkpoint-3"))
    cfg.output_dir = str(tmp_path / "b")
    resumed = Trainer(cfg)
    resumed.out.mkdir(parents=True)
    resumed.run()
    a, b = _params(tmp_path / "a" / "checkpoint-6"), _params(tmp_path / "b" / "checkpoint-6")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_gradient_accumulation_is_normalised(tmp_path):
    one = train(_cfg(tmp_path / "one", "--max_steps", "2", "--batch_size", "8", "--grad_accum", "1", "--max_grad_norm", "none"))
    two = train(_cfg(tmp_path / "two", "--max_steps", "2", "--batch_size", "4", "--grad_accum", "2", "--max_grad_norm", "none",
                     "--eval_size", "8"))
    del one, two
    a, b = _params(tmp_path / "one" / "checkpoint-2"), _params(tmp_path / "two" / "checkpoint-2")
    # the same 16 pairs per step (batches of 8 from the same shuffled order), split into 1 or 2 micro-batches
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_prefix_sharing_and_padded_rows_train_alike(tmp_path):
    train(_cfg(tmp_path / "shared", "--max_steps", "3"))
    train(_cfg(tmp_path / "padded", "--max_steps", "3", "--prefix_sharing", "false"))
    a, b = _params(tmp_path / "shared" / "checkpoint-3"), _params(tmp_path / "padded" / "checkpoint-3")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("loss", [["--loss", "dpo"], ["--loss", "dpo+sft", "--loss_weights.sft", "0.5"]],
                         ids=["dpo", "dpo+sft"])
def test_eager_gradients_train_like_the_ordinary_path(tmp_path, loss):
    """--eager_gradients true (gradients in the loss's forward, with prefix sharing and grad accumulation)
    leaves the same parameters as the ordinary fused path; DPO+SFT's token-mean NLL too, separable per
    example once the step's mean chosen length is given."""
    common = ("--max_steps", "3", "--batch_size", "8", "--grad_accum", "2", *loss)
    train(_cfg(tmp_path / "ordinary", *common))
    train(_cfg(tmp_path / "eager", *common, "--eager_gradients", "true"))
    a, b = _params(tmp_path / "ordinary" / "checkpoint-3"), _params(tmp_path / "eager" / "checkpoint-3")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("extra", [
    ["--loss", "ipo", "--loss_args.beta", "0.5"],
    ["--loss", "simpo", "--reference", "none"],
    ["--loss", "dpo+sft", "--loss_weights.sft", "0.3"],
    ["--loss", "beta_dpo"],
    ["--loss", "dpo_shift", "--loss_schedule.lam.start", "1.0", "--loss_schedule.lam.end", "0.8",
     "--loss_schedule.lam.kind", "linear"],
    ["--sync_ref_every", "1", "--sync_ref_alpha", "0.5"],
    ["--reference", "cache"],
    ["--loss", "tdpo2"],
    ["--gradient_checkpointing", "true"],
    ["--dtype", "bf16"],
    ["--loss", "kto"],
    ["--loss", "bco"],
], ids=["ipo", "simpo", "dpo+sft", "beta_dpo", "dpo_shift_schedule", "tr_dpo", "ref_cache", "tdpo2", "grad_ckpt", "bf16", "kto", "bco"])
def test_losses_references_and_schedules_run(tmp_path, extra):
    summary = train(_cfg(tmp_path, "--max_steps", "3", *extra))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(isinstance(x, float) for x in losses)
    assert summary["step"] == 3
    if "simpo" not in extra:  # the policy is its own reference at step 0 (a cached one agrees to rounding)
        assert summary["initial"]["eval/reward_accuracy"] == 0.5


def test_tr_dpo_moves_the_reference_and_checkpoints_it(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "--max_steps", "2", "--sync_ref_every", "1", "--sync_ref_alpha", "1.0"))
    trainer.run()
    for p, r in zip(trainer.model.parameters(), trainer.reference.parameters()):
        assert torch.equal(p, r)  # alpha = 1: a hard copy after each step
    assert (tmp_path / "checkpoint-2" / "reference.safetensors").is_file()


def test_ctrl_c_saves_a_checkpoint_and_stops(tmp_path, monkeypatch):
    """SIGINT as step 3 begins: that step is finished, then the checkpoint is written and the run stops."""
    trainer = Trainer(_cfg(tmp_path, "--max_steps", "10"))
    real_step = trainer.train_step

    def interrupted():
        if trainer.step == 2:
            signal.raise_signal(signal.SIGINT)
        return real_step()

    monkeypatch.setattr(trainer, "train_step", interrupted)
    summary = trainer.run()
    assert summary["interrupted"] and summary["step"] == 3
    state = json.loads((tmp_path / "checkpoint-3" / "state.json").read_text())
    assert state["tag"] == "interrupted" and state["step"] == 3


def test_resume_with_another_model_is_refused(tmp_path):
    train(_cfg(tmp_path, "--max_steps", "1"))
    cfg = _cfg(tmp_path, "--max_steps", "2", "--demo_model.hidden_size", "48", "--resume", "latest")
    with pytest.raises(ResumeError, match="written for model 'demo'"):
        Trainer(cfg).run()


def test_missing_model_path_is_a_clear_error(tmp_path):
    cfg = load_config(None, ["--model", str(tmp_path / "nope"), "--tokenizer", "byte", "--output_dir", str(tmp_path)])
    with pytest.raises(ModelPathError, match="not a local Hugging Face model directory"):
        Trainer(cfg)


def test_cli_rejects_unknown_keys_and_prints_help(capsys):
    assert cli(["train", "--max_stepz", "3"]) == 2
    err = capsys.readouterr().err
    assert "max_stepz" in err and "max_steps" in err
    assert cli(["train", "--help"]) == 0
    assert "grad_accum" in capsys.readouterr().out


def test_real_run_from_a_model_directory_and_jsonl(tmp_path):
    """``pygpo train config.yaml`` with a saved Hugging Face model and tokenizer and a JSONL dataset."""
    import transformers as tf

    from pygpo.trainer import ByteTokenizer

    tok = ByteTokenizer()
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(tmp_path / "model")
    rows = [{"prompt": f"q{i} ", "chosen": f"good {i}", "rejected": f"bad {i}!"} for i in range(24)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run.yaml").write_text(
        f"model: {tmp_path / 'model'}\ntokenizer: byte\ndataset: {tmp_path / 'data.jsonl'}\nloss: dpo\n"
        f"loss_args: {{beta: 0.2}}\nbatch_size: 4\ngrad_accum: 2\nmax_steps: 2\neval_size: 4\nmax_length: 32\n"
        f"output_dir: {tmp_path / 'out'}\nlr: 1.0e-3\n"
    )
    assert cli(["train", str(tmp_path / "run.yaml"), "--reference", str(tmp_path / "model")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["step"] == 2 and "eval/reward_accuracy" in summary["final"]


def test_per_example_loss_inputs_come_from_dataset_columns(tmp_path):
    """TODO needs ``ties`` per pair, ODPO ``scores`` per response: read from the rows' columns."""
    rows = [{"prompt": f"sort {d}=", "chosen": "".join(sorted(d)), "rejected": d, "ties": i % 3 == 0, "scores": [1.0, 0.2],
             "rewards": [1.0, 0.0]}
            for i, d in enumerate(["3412", "9182", "5031", "7264", "1938", "4520", "8317", "6059"] * 3)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for loss, prefix in (("todo", "true"), ("odpo", "true"), ("mpo", "true"), ("mpo", "false")):
        summary = train(_cfg(tmp_path / f"{loss}{prefix}", "--dataset", str(path), "--eval_size", "8", "--max_steps", "2",
                             "--loss", loss, "--generate_eval_size", "0", "--prefix_sharing", prefix))
        assert summary["step"] == 2
    bad = [dict(r) for r in rows]
    del bad[5]["ties"]
    path.write_text("".join(json.dumps(r) + "\n" for r in bad))
    from pygpo.trainer import DatasetRowError

    with pytest.raises(DatasetRowError, match="ties"):
        train(_cfg(tmp_path / "bad", "--dataset", str(path), "--eval_size", "8", "--max_steps", "1", "--loss", "todo"))


def test_unpaired_losses_split_pairs_into_desirable_and_undesirable(tmp_path):
    """KTO on preference pairs: chosen responses desirable, rejected not, z0 from mismatched pairs; the
    loss equals the registry's KTO on plain-logits scores, with and without prefix sharing."""
    import copy

    from pygpo import FusedPreferenceLoss, preference_loss
    from pygpo.trainer import ByteTokenizer
    from pygpo.trainer.models import demo_model
    from pygpo.trainer.scoring import padded_rows, score_batch

    cfg = _cfg(tmp_path)
    tok = ByteTokenizer()
    model = demo_model(cfg, tok).double()
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    enc = lambda s: tok.encode(s)  # noqa: E731
    from pygpo.integrations.transformers import enable_prefix_sharing

    enable_prefix_sharing(model)
    enable_prefix_sharing(ref)
    examples = [{"prompt_ids": [tok.bos_token_id] + enc(f"sort {d}="), "chosen_ids": enc("".join(sorted(d))) + [tok.eos_token_id],
                 "rejected_ids": enc(d[::-1]) + [tok.eos_token_id]} for d in ("3412", "90817", "5031", "726")]

    def sums(m, exs):
        rows = padded_rows(exs, tok.pad_token_id, torch.device("cpu"))
        logits = m(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits[:, :-1]
        lp = torch.log_softmax(logits, -1).gather(-1, rows["labels"].clamp(min=0)[..., None])[..., 0]
        return torch.where(rows["labels"] != -100, lp, torch.zeros((), dtype=lp.dtype)).sum(-1)  # (2B,) chosen, rejected

    with torch.no_grad():
        shifted = [dict(ex, chosen_ids=examples[(i + 1) % 4]["chosen_ids"]) for i, ex in enumerate(examples)]
        expected = preference_loss("kto", sums(model, examples), sums(ref, examples),
                                   labels=torch.tensor([True] * 4 + [False] * 4),
                                   kl_logps=sums(model, shifted)[:4], kl_ref_logps=sums(ref, shifted)[:4]).loss
        loss_fn = FusedPreferenceLoss("kto")
        for prefix in (True, False):
            out = score_batch(loss_fn, model, ref, examples, prefix_sharing=prefix, pad_id=tok.pad_token_id,
                              device=torch.device("cpu"))
            torch.testing.assert_close(out.loss, expected, rtol=1e-9, atol=1e-11)
            assert out.policy_logps.shape == (4, 2)


def test_real_run_with_the_model_directorys_tokenizer_and_conversational_parquet(tmp_path):
    """``AutoModelForCausalLM`` and ``AutoTokenizer`` from one saved directory, conversational rows (chat
    template applied) from Parquet, reference as a frozen copy."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import transformers as tf
    from test_trainer_data import _hf_tokenizer

    hf = _hf_tokenizer()
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=len(hf), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                               pad_token_id=hf.pad_token_id, eos_token_id=hf.eos_token_id))
    model.save_pretrained(tmp_path / "model")
    hf.save_pretrained(tmp_path / "model")
    rows = [{"prompt": [{"role": "user", "content": f"sort these numbers {i}"}],
             "chosen": [{"role": "assistant", "content": "hello world"}],
             "rejected": [{"role": "assistant", "content": f"the quick brown fox {i}"}]} for i in range(16)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    assert cli(["train", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "data.parquet"), "--batch_size", "4",
                "--max_steps", "2", "--eval_size", "4", "--max_length", "64", "--lr", "1e-3",
                "--output_dir", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["data"]["train"]["formats"] == {"conversational": 16}  # counted before the held-out split
    assert summary["step"] == 2


def test_model_prefix_sharing_cannot_reproduce_is_a_one_line_error_with_the_remedy(tmp_path, capsys):
    """A recurrent hybrid (Jamba: its state would run from one response into the next in a packed row) is
    refused by prefix sharing; ``pygpo train`` says so in one line with the option that trains it anyway,
    and with that option it trains."""
    import transformers as tf
    from test_trainer_data import _hf_tokenizer

    hf = _hf_tokenizer()
    torch.manual_seed(0)
    config = tf.JambaConfig(vocab_size=len(hf), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1,
                            expert_layer_period=2, num_experts=2, num_experts_per_tok=1, mamba_d_state=4,
                            mamba_expand=1, pad_token_id=hf.pad_token_id,
                            eos_token_id=hf.eos_token_id)
    tf.JambaForCausalLM(config).save_pretrained(tmp_path / "model")
    hf.save_pretrained(tmp_path / "model")
    args = ["train", "--model", str(tmp_path / "model"), "--max_steps", "1", "--batch_size", "2", "--eval_size", "2",
            "--max_length", "48", "--eval_fraction", "0", "--output_dir", str(tmp_path / "out")]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' own progress output
    assert err.startswith("pygpo train: JambaForCausalLM has recurrent layers")
    assert err.endswith("train without it with prefix_sharing: false (--prefix_sharing false)")
    assert cli(args + ["--prefix_sharing", "false"]) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["step"] == 1

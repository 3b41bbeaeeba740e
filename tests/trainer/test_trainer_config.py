"""TrainConfig: YAML + overrides, type coercion, presets, unknown keys, validation, round trip."""

import math

import pytest
import torch
import yaml

import pygpo
from pygpo.trainer.config import (
    DEMO_PRESET,
    FIELD_NAMES,
    RUN_PRESET,
    ConfigError,
    TrainConfig,
    config_help,
    load_config,
    parse_overrides,
)


def _yaml(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_no_arguments_is_the_demo_with_its_preset():
    cfg = load_config()
    assert cfg.is_demo and cfg.dataset == "demo" and cfg.loss == "dpo"
    for key, value in DEMO_PRESET.items():
        assert getattr(cfg, key) == value, key
    assert cfg.demo_model["hidden_size"] == 64


def test_a_model_path_takes_the_run_preset_and_explicit_values_win(tmp_path):
    cfg = load_config(_yaml(tmp_path, {"model": "/models/llama", "dataset": "d.jsonl", "batch_size": 2}))
    assert cfg.lr == RUN_PRESET["lr"] and cfg.max_length == RUN_PRESET["max_length"]
    assert cfg.batch_size == 2 and cfg.tokenizer is None and cfg.max_steps is None
    assert cfg.max_prompt_length == RUN_PRESET["max_prompt_length"]
    cfg = load_config(_yaml(tmp_path, {"model": "/models/llama", "max_prompt_length": None}), ["--max_length", "none"])
    assert cfg.max_prompt_length is None and cfg.max_length is None  # given as none: no limit, not the preset


def test_precedence_and_override_syntax(tmp_path):
    path = _yaml(tmp_path, "lr: 1e-5\nmax_steps: 10\nprefix_sharing: true\nloss: dpo+sft\nloss_args: {beta: 0.3}\n")
    cfg = load_config(path)
    assert cfg.lr == 1e-5 and isinstance(cfg.lr, float)  # '1e-5' is a string in YAML 1.1
    cfg = load_config(
        path,
        ["--lr=2e-5", "--max-steps", "7", "--gradient_checkpointing", "--prefix_sharing", "false",
         "--tokenizer", "none", "--max_grad_norm", "null", "--loss_args.alpha", "0.1", "--dtype", "bf16"],
    )
    assert (cfg.lr, cfg.max_steps, cfg.gradient_checkpointing, cfg.prefix_sharing) == (2e-5, 7, True, False)
    assert cfg.tokenizer is None and cfg.max_grad_norm is None and cfg.dtype == "bf16"
    assert cfg.loss_args == {"beta": 0.3, "alpha": 0.1}  # dotted keys merge into the file's mapping
    assert load_config(path, ["--loss_args", "{beta: 0.5}"]).loss_args == {"beta": 0.5}
    assert load_config(None, ["--max_steps", "20.0"]).max_steps == 20
    assert parse_overrides(["--a", "-1", "--b=x=y", "--c"]) == [("a", "-1"), ("b", "x=y"), ("c", None)]


def test_partial_demo_model_keeps_the_other_sizes():
    cfg = load_config(None, ["--demo_model.hidden_size", "128", "--demo_model.num_hidden_layers=3"])
    assert cfg.demo_model["hidden_size"] == 128 and cfg.demo_model["num_hidden_layers"] == 3
    assert cfg.demo_model["num_attention_heads"] == 4
    with pytest.raises(ConfigError, match="unknown demo_model key 'hiden_size'. Did you mean hidden_size"):
        load_config(None, ["--demo_model.hiden_size", "8"])


def test_unknown_keys_list_close_matches_and_every_valid_key(tmp_path):
    for args, path in ((["--lrr", "1"], None), ([], _yaml(tmp_path, {"batchsize": 4}))):
        with pytest.raises(ConfigError) as info:
            load_config(path, args)
        msg = str(info.value)
        assert "unknown config key" in msg and "Did you mean" in msg
        assert all(name in msg for name in FIELD_NAMES)
    with pytest.raises(ConfigError, match="unknown config key 'zzz'. Valid keys: model,"):
        load_config(None, ["--zzz", "1"])


@pytest.mark.parametrize(
    "args,match",
    [
        (["--batch_size", "2.5"], "batch_size: expected int or none, got '2.5'"),
        (["--seed", "2.5"], "seed: expected int, got '2.5'"),
        (["--batch_size", "true"], "batch_size: expected int"),
        (["--lr", "fast"], "lr: expected float or none"),
        (["--prefix_sharing", "maybe"], "prefix_sharing: expected bool"),
        (["--loss_args", "[1, 2]"], "loss_args: expected a mapping"),
        (["--lr"], "--lr: expected a value"),
        (["lr", "1"], "expected --key value"),
        (["--seed.x", "1"], "seed is not a mapping"),
    ],
)
def test_type_errors_name_the_key_and_the_type(args, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, args)


@pytest.mark.parametrize(
    "args,match",
    [
        (["--dtype", "fp16"], "dtype: expected one of fp32 | bf16"),
        (["--schedule", "step"], "schedule: expected one of constant | linear | cosine"),
        (["--lr", "0"], "lr: expected a finite number > 0"),
        (["--lr", "nan"], "lr: expected a finite number > 0"),
        (["--batch_size", "0"], "batch_size: expected an int >= 1"),
        (["--eval_fraction", "1"], "eval_fraction"),
        (["--max_length", "16", "--max_prompt_length", "16"], "max_prompt_length: expected < max_length"),
        (["--reference", "cache", "--sync_ref_every", "10"], "sync_ref_every: needs a reference model"),
        (["--sync_ref_alpha", "0"], "sync_ref_alpha"),
        (["--reference", "none"], "reference: 'none', but loss dpo needs reference scores"),
        (["--device", "tpu"], "device"),
        (["--loss", "dpoo"], "loss: unknown loss 'dpoo'.*'dpo'"),
        (["--loss_args.betta", "0.1"], "loss_args.betta: not a hyper-parameter of loss 'dpo'; valid: beta"),
        (["--loss_args.beta", "-1"], "beta=-1.*out of range"),
        (["--loss", "dpo+sft", "--loss_weights.ipo", "1"], "loss_weights.ipo: not a component.*dpo, sft"),
        (["--loss", "dpo+sft", "--loss_args.ipo.beta", "1"], "'ipo' is not a component"),
        (["--loss", "dpo_shift", "--loss_schedule.lam.start", "0.9"], "loss_schedule.lam: expected a mapping with start, end"),
        (["--loss", "dpo_shift", "--loss_schedule.lam", "{start: 0.9, end: 1, kind: step}"], "loss_schedule.lam.kind"),
        (["--loss_schedule.gamma", "{start: 0, end: 1}"], "loss_schedule.gamma: not a hyper-parameter"),
    ],
)
def test_invalid_values_are_errors(args, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, args)


def test_combined_loss_config_drives_preference_loss():
    cfg = load_config(None, ["--loss", "dpo+sft", "--loss_args.dpo.beta", "0.2", "--loss_args.sft.alpha", "0.5",
                             "--loss_weights.sft", "0.3"])
    assert cfg.loss_components() == ["dpo", "sft"]
    assert cfg.loss_name() == {"dpo": 1.0, "sft": 0.3}
    policy = torch.tensor([[-3.0, -5.0], [-4.0, -2.5]], dtype=torch.float64)
    ref = torch.tensor([[-3.5, -4.0], [-4.2, -3.0]], dtype=torch.float64)
    lengths = torch.tensor([[3.0, 4.0], [2.0, 5.0]], dtype=torch.float64)
    out = pygpo.preference_loss(cfg.loss_name(), policy, ref, lengths=lengths, **cfg.loss_args)
    # independent reference: DPO (Rafailov et al., 2023) + 0.3 * 0.5 * token-mean NLL of chosen (RPO)
    margins = [(-3.0 + 3.5) - (-5.0 + 4.0), (-4.0 + 4.2) - (-2.5 + 3.0)]
    dpo = sum(math.log1p(math.exp(-0.2 * m)) for m in margins) / 2
    nll = (3.0 + 4.0) / (3.0 + 2.0)
    assert out.loss.item() == pytest.approx(dpo + 0.3 * 0.5 * nll, rel=1e-12)
    assert load_config().loss_name() == "dpo"
    assert cfg.needs_reference() and load_config(None, ["--loss", "dpo"]).needs_reference()
    simpo = load_config(None, ["--loss", "simpo", "--reference", "none"])
    assert not simpo.needs_reference()


def test_loss_schedule_is_validated_and_completed():
    cfg = load_config(None, ["--loss", "dpo_shift", "--loss_schedule.lam.start", "0.9", "--loss_schedule.lam.end", "1"])
    assert cfg.loss_schedule == {"lam": {"start": 0.9, "end": 1.0, "kind": "linear"}}
    cfg = load_config(None, ["--loss", "dpo_shift", "--loss_args.beta", "0.2",
                             "--loss_schedule.lam", "{start: 0.5, end: 1.0, kind: linear}"])
    assert cfg.loss_args_at(0.0) == {"beta": 0.2, "lam": 0.5}
    assert cfg.loss_args_at(0.25) == {"beta": 0.2, "lam": 0.625}
    assert cfg.loss_args_at(7.0)["lam"] == 1.0  # clamped to the end
    cos = load_config(None, ["--loss", "dpo_shift", "--loss_schedule.lam", "{start: 0.5, end: 1.0, kind: cosine}"])
    assert [round(cos.loss_args_at(p)["lam"], 12) for p in (0.0, 0.5, 1.0)] == [0.5, 0.75, 1.0]
    const = load_config(None, ["--loss", "dpo_shift", "--loss_schedule.lam", "{start: 0.5, end: 1.0, kind: constant}"])
    assert const.loss_args_at(0.9)["lam"] == 0.5


def test_to_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["--loss", "dpo+sft", "--loss_args.sft.alpha", "0.2", "--eval_size", "64",
                             "--demo_model.hidden_size", "96", "--resume", "latest"])
    text = cfg.to_yaml()
    assert yaml.safe_load(text)["loss_args"] == {"sft.alpha": 0.2}
    assert load_config(_yaml(tmp_path, text)) == cfg
    assert list(yaml.safe_load(text)) == list(FIELD_NAMES)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(_yaml(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_yaml(tmp_path, "a: [1\n"))
    assert load_config(_yaml(tmp_path, "")) == load_config()
    with pytest.raises(ConfigError, match="loss_args: expected a mapping"):
        load_config(_yaml(tmp_path, "loss_args: 3\n"), ["--loss_args.beta", "1"])


def test_dataclass_validates_on_construction_and_help_lists_every_option():
    with pytest.raises(ConfigError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    assert TrainConfig(lr="3e-4").lr == 3e-4
    text = config_help()
    assert all(f"--{name} (" in text for name in FIELD_NAMES)

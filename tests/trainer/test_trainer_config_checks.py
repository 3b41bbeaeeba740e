"""TrainConfig refusals found by an audit: each is a ConfigError naming the option, raised by
load_config before any model, data or cache is built."""

import pytest
import yaml

import pygpo
from pygpo.trainer.config import NULLABLE_PRESET_FIELDS, ConfigError, config_help, load_config


def _refused(overrides, *needles, path=None):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    return str(info.value)


# -- 1. reference: cache with losses that need a reference model at every step ---------------------


@pytest.mark.parametrize("loss", ["kto", "sparsepo", "tdpo1", "tdpo2", "rrpo", "dpo+tdpo2"])
def test_cache_is_refused_for_losses_that_need_the_reference_model(loss):
    name = loss.split("+")[-1]
    message = _refused(["--loss", loss, "--reference", "cache"], "reference", "'cache'", name)
    assert "copy" in message  # the remedy
    # the same losses run with a reference model
    assert load_config(None, ["--loss", loss, "--reference", "copy"]).reference == "copy"


def test_cache_refusal_follows_the_registry_inputs():
    """Every registry loss whose inputs include the token KL or KTO's mismatched-pair reference scores is
    refused with a cache; losses of sequence scores only (DPO, IPO, the unpaired APO-zero) are accepted."""
    needing = {k for k in pygpo.losses.names()
               if {"kl", "kl_ref_logps"} & set(pygpo.losses.get(k).input_names)}
    assert {"kto", "sparsepo", "tdpo1", "tdpo2", "rrpo"} <= needing
    for key in ("dpo", "ipo", "apo_zero_unpaired", "simpo"):
        assert load_config(None, ["--loss", key, "--reference", "cache"]).reference == "cache"


# -- 2. schedule ends are range-checked -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_end_out_of_range_is_refused(kind):
    base = ["--loss", "dpo_shift", "--loss_schedule.lam.start", "1.0", "--loss_schedule.lam.kind", kind]
    _refused(base + ["--loss_schedule.lam.end", "7"], "loss_schedule.lam.end", "(0, 1]")
    _refused(base + ["--loss_schedule.lam.end", "0"], "loss_schedule.lam.end")
    cfg = load_config(None, base + ["--loss_schedule.lam.end", "0.5"])
    # every value the schedule reaches is inside (0, 1]
    values = [cfg.loss_args_at(p / 20)["lam"] for p in range(21)]
    assert values[0] == 1.0 and abs(values[-1] - 0.5) < 1e-12 and all(0.5 - 1e-12 <= v <= 1.0 for v in values)


def test_schedule_start_and_non_finite_ends_are_refused():
    base = ["--loss", "dpo_shift"]
    _refused(base + ["--loss_schedule.lam", "{start: 1.5, end: 0.5}"], "loss_schedule.lam.start")
    _refused(base + ["--loss_schedule.lam", "{start: 0.5, end: .nan}"], "loss_schedule.lam.end", "finite")
    _refused(base + ["--loss_schedule.lam", "{start: .inf, end: 0.5}"], "loss_schedule.lam.start", "finite")


def test_constant_schedule_checks_only_the_value_it_reaches():
    cfg = load_config(None, ["--loss", "dpo_shift", "--loss_schedule.lam", "{start: 0.9, end: 7, kind: constant}"])
    assert cfg.loss_args_at(0.0)["lam"] == cfg.loss_args_at(1.0)["lam"] == 0.9
    _refused(["--loss", "dpo_shift", "--loss_schedule.lam", "{start: 7, end: 0.9, kind: constant}"],
             "loss_schedule.lam.start")


def test_schedule_of_a_component_and_of_a_non_real_hyper_parameter(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"loss": "dpo+sft", "loss_args": {"beta": 0.2},
                                    "loss_schedule": {"dpo.beta": {"start": 0.1, "end": -1.0}}}))
    _refused([], "loss_schedule.dpo.beta.end", path=path)
    _refused(["--loss", "ipo", "--loss_schedule.length_normalize", "{start: 1, end: 0}"],
             "loss_schedule.length_normalize", "cannot be scheduled")
    _refused(["--loss", "group_robust", "--loss_schedule.num_groups", "{start: 2, end: 4}"],
             "loss_schedule.num_groups", "takes integers", "cannot move along a linear schedule")


# -- 3. "none" only where it means something --------------------------------------------------------


@pytest.mark.parametrize("key", ["batch_size", "lr", "output_dir", "warmup_steps", "schedule", "eval_every",
                                 "generate_eval_size", "max_new_tokens"])
@pytest.mark.parametrize("model", ["demo", "/models/llama"])
def test_none_is_refused_on_preset_fields_without_a_none_meaning(key, model, tmp_path):
    _refused(["--model", model, f"--{key}", "none"], key, "none")
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {model}\n{key}: null\n")
    _refused([], key, path=path)


def test_none_keeps_its_meaning_where_documented():
    cfg = load_config(None, [f"--{k}=none" for k in NULLABLE_PRESET_FIELDS])
    assert all(getattr(cfg, k) is None for k in NULLABLE_PRESET_FIELDS)
    help_lines = {line.split()[0]: line for line in config_help().splitlines()}
    assert "or none" not in help_lines["--batch_size"] and "or none" not in help_lines["--output_dir"]
    assert "or none" in help_lines["--max_prompt_length"] and "or none" in help_lines["--max_grad_norm"]


# -- 4. loss weights ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-0.5"])
def test_loss_weights_must_be_finite_and_non_negative(value):
    _refused(["--loss", "dpo+sft", f"--loss_weights.sft={value}"], "loss_weights.sft", ">= 0")


def test_loss_weights_not_all_zero():
    _refused(["--loss", "dpo+sft", "--loss_weights.sft", "0", "--loss_weights.dpo", "0"], "loss_weights", "0")
    _refused(["--loss", "dpo", "--loss_weights.dpo", "0"], "loss_weights")
    cfg = load_config(None, ["--loss", "dpo+sft", "--loss_weights.dpo", "0"])  # sft keeps its default 1
    assert cfg.loss_name() == {"dpo": 0.0, "sft": 1.0}


# -- 5. duplicate loss components, empty paths -------------------------------------------------------


def test_duplicate_loss_components_are_refused():
    _refused(["--loss", "dpo+dpo"], "loss", "dpo", "more than once")
    _refused(["--loss", "dpo+sft+ dpo"], "loss", "more than once")


@pytest.mark.parametrize("key", ["output_dir", "reference_cache", "tokenizer", "eval_dataset", "resume"])
def test_empty_paths_are_refused(key):
    _refused([f"--{key}=", ], key, "non-empty")
    _refused([f"--{key}", "  "], key, "non-empty")


def test_pmpo_gets_a_reference_model_for_its_token_kl():
    """PMPO is reference-free by its scores, but its KL(pi_ref || pi_theta) needs the reference model."""
    assert load_config(None, ["--loss", "pmpo"]).needs_reference()
    assert not load_config(None, ["--loss", "simpo"]).needs_reference()
    _refused(["--loss", "pmpo", "--reference", "none"], "reference", "pmpo", "token KL")

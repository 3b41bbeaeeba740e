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


# -- 6. reducers -------------------------------------------------------------------------------------


def test_reducer_and_its_options_reach_the_fused_loss_options():
    cfg = load_config(None, ["--reducer", "ld", "--reducer_args.alpha", "0.5"])
    assert cfg.fused_loss_options() == {"reducer": "ld", "reducer_args": {"alpha": 0.5}, "eager_gradients": False}
    assert load_config().fused_loss_options()["reducer"] == "sum"
    cfg = load_config(None, ["--reducer", "sampled", "--reducer_args", "{seed: 3}", "--loss", "ipo"])
    assert cfg.reducer_args == {"seed": 3}
    assert load_config(None, ["--reducer", "mean", "--reference", "cache"]).reducer == "mean"


@pytest.mark.parametrize("key", ["ld", "mean", "sampled", "sum"])
def test_a_reducer_given_as_the_loss_is_refused_with_the_reducer_option(key):
    message = _refused(["--loss", key], "loss", f"{key!r} is a reducer", f"--reducer {key}")
    assert "--loss dpo" in message
    _refused(["--loss", f"dpo+{key}"], f"{key!r} is a reducer")
    assert "reducers sum | mean | ld | sampled" in _refused(["--loss", "weighted"], "'weighted' is a reducer")


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--reducer", "weighted"], ["reducer: 'weighted' needs per-token inputs", "sum | mean | ld | sampled"]),
        (["--reducer", "segments"], ["reducer: 'segments' needs per-token inputs"]),
        (["--reducer", "median"], ["reducer: expected one of sum | mean | ld | sampled, got 'median'"]),
        (["--reducer", "dpo"], ["reducer: expected one of"]),
        (["--reducer", "ld", "--reducer_args.alpha", "1.5"], ["reducer_args", "alpha=1.5", "[0, 1]"]),
        (["--reducer", "ld", "--reducer_args.seed", "1"], ["reducer_args.seed: not an option of reducer 'ld'; valid: alpha"]),
        (["--reducer_args.alpha", "0.5"], ["reducer_args.alpha: not an option of reducer 'sum'; valid: (none)"]),
        (["--reducer", "sampled", "--reducer_args.seed", "0.5"], ["reducer_args", "seed"]),
        (["--reducer", "mean", "--loss", "simpo"], ["reducer:", "'simpo' divides its scores by the response lengths"]),
        (["--reducer", "ld", "--loss", "orpo"], ["reducer:", "'orpo'", "reducer='sum'"]),
        (["--reducer", "ld", "--reference", "cache"], ["reducer: 'ld'", "reference: 'cache'", "copy"]),
        (["--reducer", "sampled", "--reference", "cache"], ["reducer: 'sampled'", "reference: 'cache'"]),
        (["--reducer", "ld", "--eager_gradients"], ["eager_gradients: cannot run reducer='ld'"]),
    ],
)
def test_reducer_refusals_name_the_option(args, needles):
    _refused(args, *needles)


def test_what_only_the_loss_module_knows_is_refused_at_config_time():
    """A stateful head's required hyper-parameter and what eager gradients cannot run: refused by
    load_config, before any data or model is built."""
    _refused(["--loss", "group_robust"], "loss:", "num_groups")
    assert load_config(None, ["--loss", "group_robust", "--loss_args.num_groups", "3"]).loss_args == {"num_groups": 3}
    _refused(["--loss", "beta_dpo", "--eager_gradients"], "eager_gradients: cannot run the stateful 'beta_dpo'",
             "eager_gradients: false")
    assert load_config(None, ["--eager_gradients"]).eager_gradients
    # a token-mean NLL runs eagerly: the loop gives every call the step's mean chosen length
    assert load_config(None, ["--loss", "sft", "--eager_gradients"]).eager_gradients


# -- 7. demo model sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--demo_model.hidden_size", "30"], ["demo_model.hidden_size: expected a multiple of num_attention_heads (4), got 30"]),
        (["--demo_model.num_key_value_heads", "3"], ["demo_model.num_key_value_heads: expected a divisor of "
                                                     "num_attention_heads (4), got 3"]),
        (["--demo_model.num_attention_heads", "8", "--demo_model.num_key_value_heads", "3"],
         ["demo_model.num_key_value_heads", "(8), got 3"]),
        (["--demo_model.hidden_size", "20"], ["demo_model.hidden_size", "20 / 4 = 5 must be even", "RoPE"]),
    ],
)
def test_demo_model_sizes_a_llama_cannot_take_are_refused(args, needles):
    assert "\n" not in _refused(args, *needles)


def test_demo_model_sizes_a_llama_can_take_build(tmp_path):
    """The sizes the check accepts build and run a real Llama (grouped-query attention included)."""
    from pygpo.trainer.models import demo_model
    from pygpo.trainer.tokenizer import ByteTokenizer

    cfg = load_config(None, ["--demo_model", "{hidden_size: 24, num_attention_heads: 6, num_key_value_heads: 2, "
                                             "intermediate_size: 16, num_hidden_layers: 1}"])
    model = demo_model(cfg, ByteTokenizer())
    import torch

    assert model(torch.tensor([[257, 50, 51]])).logits.shape == (1, 3, 263)


# -- 10. options that would be accepted and then ignored ------------------------------------------------


def test_sync_ref_every_needs_a_loss_with_a_reference_model():
    message = _refused(["--loss", "simpo", "--sync_ref_every", "2"], "sync_ref_every", "'simpo'", "no reference model")
    assert "\n" not in message
    assert load_config(None, ["--loss", "simpo"]).sync_ref_every == 0
    assert load_config(None, ["--loss", "dpo", "--sync_ref_every", "2"]).sync_ref_every == 2
    assert load_config(None, ["--loss", "pmpo", "--sync_ref_every", "2"]).sync_ref_every == 2  # token KL: a reference


def test_greedy_evaluation_is_refused_for_a_real_model():
    _refused(["--model", "/models/llama", "--generate_eval_size", "8"], "generate_eval_size", "model: demo")
    cfg = load_config(None, ["--model", "/models/llama", "--generate_eval_size", "0", "--max_new_tokens", "16"])
    assert cfg.generate_eval_size == 0
    help_lines = {line.split()[0]: line for line in config_help().splitlines()}
    assert "model: demo only" in help_lines["--generate_eval_size"] and "demo only" in help_lines["--max_new_tokens"]


def test_eval_size_with_an_eval_dataset_is_refused():
    _refused(["--dataset", "d.jsonl", "--eval_dataset", "e.jsonl", "--eval_size", "4"], "eval_size", "eval_dataset")


def test_explicit_epochs_replace_the_demo_presets_steps(tmp_path):
    from pygpo.trainer.loop import total_steps

    cfg = load_config(None, ["--epochs", "2"])
    assert cfg.max_steps is None and total_steps(cfg, 4000) == 250  # ceil(2 * 4000 / 32)
    assert load_config(None, ["--epochs", "2", "--max_steps", "7"]).max_steps == 7  # given too: max_steps wins
    assert load_config().max_steps == 200  # the preset without epochs
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 0.5\n")
    assert load_config(path).max_steps is None
    # the run's config.yaml (every field written) reads back to the same run length
    assert load_config(_write(tmp_path, load_config(None, ["--epochs", "3"]).to_yaml())).max_steps is None
    assert load_config(_write(tmp_path, load_config().to_yaml())).max_steps == 200


def _write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


# -- 15. schedules of a combined loss's component on the command line -------------------------------------


def test_schedule_of_a_component_from_the_command_line(tmp_path):
    args = ["--loss", "dpo+sft", "--loss_schedule.dpo.beta.start", "0.1", "--loss_schedule.dpo.beta.end", "0.3",
            "--loss_schedule.dpo.beta.kind", "cosine"]
    cfg = load_config(None, args)
    assert cfg.loss_schedule == {"dpo.beta": {"start": 0.1, "end": 0.3, "kind": "cosine"}}
    assert cfg.loss_args_at(0.5) == {"dpo.beta": pytest.approx(0.2)}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"loss": "dpo+sft", "loss_schedule": {"dpo.beta": {"start": 0.1, "end": 0.3,
                                                                                      "kind": "cosine"}}}))
    assert load_config(path) == cfg  # the same as the YAML form
    whole = load_config(None, ["--loss", "dpo+sft", "--loss_schedule.dpo.beta", "{start: 0.1, end: 0.3, kind: cosine}"])
    assert whole == cfg
    _refused(["--loss", "dpo+sft", "--loss_schedule.dpo.beta.start", "0.1"], "loss_schedule.dpo.beta", "start, end")
    _refused(["--loss", "dpo+sft", "--loss_schedule.ipo.beta.start", "0.1", "--loss_schedule.ipo.beta.end", "0.2"],
             "loss_schedule.ipo.beta", "'ipo' is not a component")
    assert load_config(None, ["--loss", "dpo_shift", "--loss_schedule.lam.start", "1", "--loss_schedule.lam.end",
                              "0.8"]).loss_schedule == {"lam": {"start": 1.0, "end": 0.8, "kind": "linear"}}

"""`pygpo check-model`: prefix sharing and the fused lm_head checked on a tiny random copy of a model built
from its config alone; exit 0 (supported or refused with a message), 1 (a check FAILED), 2 (bad input)."""

from __future__ import annotations

import json

import pytest
import torch

from pygpo.__main__ import main as cli
from pygpo.integrations.model_check import ModelSpecError, check_model
from pygpo.integrations.tiny_model import load_config, tiny_config


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = cli(["check-model", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_saved_llama_directory_is_supported(tmp_path, capsys):
    from transformers import LlamaConfig

    # config only, no weights: what a user has after downloading config.json
    LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=8,
                num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True).save_pretrained(tmp_path)
    code, out, err = _run(capsys, str(tmp_path))
    assert code == 0, out + err
    assert "LlamaForCausalLM" in out and "layers 2, hidden 64, heads 8, kv heads 2" in out  # GQA ratio 4 kept
    lines = out.splitlines()
    assert "prefix sharing: supported" in lines and "fused lm_head: supported" in lines
    assert [line.split()[:2] for line in lines if line.startswith("  ") and line.split()[0] in (
        "lm_head", "prefix_sharing", "no_layout_forward")] == [
        ["lm_head", "pass"], ["prefix_sharing", "pass"], ["no_layout_forward", "pass"]]
    # the config.json path names the same model
    code, out, _ = _run(capsys, str(tmp_path / "config.json"))
    assert code == 0 and "prefix sharing: supported" in out


@pytest.mark.parametrize("model_type", ["gpt_oss", "gemma3_text"])
def test_sliding_windows_sinks_and_softcaps_are_supported(model_type, capsys):
    code, out, err = _run(capsys, model_type)
    assert code == 0, out + err
    assert "prefix sharing: supported" in out.splitlines() and "fused lm_head: supported" in out.splitlines()
    assert "sliding window 4" in out  # the window binds on the check's sequences


def test_recurrent_model_is_refused_with_the_reason(capsys):
    code, out, _ = _run(capsys, "jamba")
    assert code == 0
    verdict = next(line for line in out.splitlines() if line.startswith("prefix sharing: "))
    assert verdict.startswith("prefix sharing: refused: JambaForCausalLM has recurrent layers")
    assert "fused lm_head: supported" in out.splitlines()
    assert "no_layout_forward  skipped" in out


def test_json_report_holds_every_check(capsys):
    code, out, _ = _run(capsys, "qwen2", "--json", "--layers", "3")
    report = json.loads(out)
    assert code == 0 == report["exit_code"]
    assert report["causal_lm"] == "Qwen2ForCausalLM" and report["tiny_config"]["layers"] == 3
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == ["lm_head", "prefix_sharing", "no_layout_forward"]
    assert all(c["status"] == "pass" for c in checks.values())
    assert 0 <= checks["lm_head"]["errors"]["logprob"] < 1e-4
    assert 0 <= checks["prefix_sharing"]["errors"]["logprob"] < 2e-4
    assert 0 <= checks["prefix_sharing"]["errors"]["grad"] < 1e-3
    assert 0 <= checks["no_layout_forward"]["errors"]["logit"] < 1e-4
    assert report["verdict"] == {"prefix_sharing": {"status": "supported", "reason": ""},
                                 "fused_lm_head": {"status": "supported", "reason": ""}}


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    cases = {"lamma": "did you mean llama", str(tmp_path / "missing"): "no such file or directory",
             str(tmp_path / "empty"): "without a config.json", str(tmp_path / "bad.json"): "cannot read"}
    for spec, expected in cases.items():
        code, out, err = _run(capsys, spec)
        assert code == 2 and out == "", (spec, out)
        assert err.startswith("pygpo check-model: ") and err.count("\n") == 1 and expected in err, err
    code, out, err = _run(capsys, "llama", "--layers", "0")
    assert code == 2 and err == "pygpo check-model: layers must be a positive integer, got 0\n"


def _causal_over_the_whole_row(q, k, v, layout, *, scale=None, backend="auto", sliding_window=None, sinks=None):
    """A wrong prefix attention: causal over the packed row, so responses see the responses before them."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def test_a_wrong_result_is_reported_as_failed(capsys, monkeypatch):
    # the one patch of this file: it stands for a bug in pygpo's prefix attention
    import pygpo.integrations.transformers as integration

    monkeypatch.setattr(integration, "prefix_attention", _causal_over_the_whole_row)
    code, out, _ = _run(capsys, "llama")
    assert code == 1
    assert "prefix sharing: FAILED (prefix_sharing: a pygpo bug, please report it)" in out.splitlines()
    assert "fused lm_head: supported" in out.splitlines()
    row = next(line for line in out.splitlines() if line.split()[:1] == ["prefix_sharing"])
    assert row.split()[1] == "FAILED" and "differ from separate prompt + response forwards" in row
    code, out, _ = _run(capsys, "llama", "--json")
    check = next(c for c in json.loads(out)["checks"] if c["name"] == "prefix_sharing")
    assert code == 1 and check["status"] == "FAILED" and check["errors"]["logprob"] > 1e-2


def test_triton_backend_runs_the_kernels_in_the_interpreter(capsys):
    code, out, err = _run(capsys, "gpt_oss", "--backend", "triton", "--json")  # sinks and windows in the kernel
    report = json.loads(out)
    assert code == 0, out + err
    assert report["backend"] == "triton" and [c["status"] for c in report["checks"]] == ["pass"] * 3


def test_torch_threads_are_restored_after_a_check_and_an_error():
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # not the one thread the checks run on, whatever this machine's default
    try:
        assert check_model("qwen2").exit_code == 0 and torch.get_num_threads() == 3
        # DeepSeek-V2's default config leaves experts per token unset: its tiny copy's own forward fails
        with pytest.raises(ModelSpecError, match="does not run in transformers"):
            check_model("deepseek_v2")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_a_language_the_config_leaves_unset_is_supplied():
    # X-MOD's forward refuses input of no language; its default config names none
    report = check_model("xmod")
    assert [(c.name, c.status) for c in report.checks] == [
        ("lm_head", "refused"), ("prefix_sharing", "refused"), ("no_layout_forward", "skipped")]
    assert "default_language is unset: the tiny copy runs with the first of languages, 'en_XX'" in report.notes


@pytest.mark.parametrize("model_type, reason", [
    ("musicgen", "predicts 4 token streams at every position"),  # one head per audio codebook
    ("gemma4_unified_assistant", "does not run on its own: all 30 of its layers reuse key/value states"),
    ("dbrx", "(a model_type's default config may leave settings unset"),  # attn_config without rope_theta
])
def test_models_that_cannot_be_checked_say_why(model_type, reason):
    with pytest.raises(ModelSpecError) as info:
        check_model(model_type)
    assert reason in str(info.value)


def test_nested_sub_configs_are_shrunk():
    from transformers import DbrxConfig

    # DBRX's own config.json sets what its default config leaves out (rope_theta in attn_config)
    config = DbrxConfig(attn_config={"kv_n_heads": 8, "rope_theta": 500000.0, "clip_qkv": 8.0},
                        ffn_config={"moe_num_experts": 16, "moe_top_k": 4})
    report = check_model(config)
    assert [c.status for c in report.checks] == ["pass"] * 3, report.format()
    tiny = tiny_config(config).config
    assert tiny.attn_config.kv_n_heads == 2 and tiny.n_heads == 4  # grouped, ratio 2 kept across configs
    assert tiny.ffn_config.hidden_size == tiny.d_model == 64 and tiny.ffn_config.moe_num_experts == 4


# -- what the tiny copy keeps (configs only, no model is built) ----------------------------------------


def _tiny(model_type: str, **overrides):
    config = load_config(model_type)
    for name, value in overrides.items():
        setattr(config, name, value)
    return tiny_config(config).config


def test_tiny_copy_keeps_every_kind_of_layer():
    gemma = _tiny("gemma3_text")  # five sliding layers to one full one
    assert gemma.num_hidden_layers == 2 and gemma.layer_types == ["sliding_attention", "full_attention"]
    assert gemma.sliding_window == 4 and gemma.hidden_size == 64
    assert set(gemma.rope_parameters) == {"sliding_attention", "full_attention"}  # one RoPE per layer type
    assert gemma.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
    llama4 = _tiny("llama4_text")  # every fourth layer has no RoPE and attends globally
    assert sorted(llama4.no_rope_layers) == [0, 1] and len(llama4.layer_types) == llama4.num_hidden_layers
    assert set(llama4.layer_types) == {"chunked_attention", "full_attention"}
    assert llama4.attention_chunk_size >= 64  # pygpo refuses longer layouts at run time; kept from binding here
    deepseek = _tiny("deepseek_v3")  # three dense layers, then mixture of experts; latent attention
    assert deepseek.num_hidden_layers == 2 and deepseek.first_k_dense_replace == 1
    assert deepseek.n_routed_experts == 4 and deepseek.num_experts_per_tok == 2 and deepseek.n_shared_experts == 1
    assert deepseek.q_lora_rank is not None
    assert deepseek.qk_head_dim == deepseek.qk_nope_head_dim + deepseek.qk_rope_head_dim
    assert deepseek.v_head_dim != deepseek.qk_head_dim  # value heads narrower than query/key heads, as at full size


def test_tiny_copy_keeps_the_attention_head_layout():
    qwen = _tiny("qwen2", num_attention_heads=28, num_key_value_heads=4, hidden_size=3584)
    assert (qwen.num_attention_heads, qwen.num_key_value_heads) == (8, 2)  # grouped, ratio 7 capped at 4
    mqa = _tiny("llama", num_attention_heads=16, num_key_value_heads=1)
    assert (mqa.num_attention_heads, mqa.num_key_value_heads) == (4, 1)  # multi-query stays multi-query
    mha = _tiny("llama")
    assert mha.num_attention_heads == mha.num_key_value_heads == 4
    assert mha.hidden_size // mha.num_attention_heads == mha.head_dim == 16
    with pytest.raises(ValueError, match="layers must be a positive integer"):
        tiny_config(load_config("llama"), layers=0)


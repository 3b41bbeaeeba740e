"""README.md's Python examples run as written and keep the promises of their comments.

Every ```python block of README.md is read when the tests are collected and run with the README's own
text. A block is matched to its case by the heading above it; the test id names the block's position,
README line and first line. Self-contained blocks run in an empty namespace. Blocks that use names a
reader already has (``model``, ``prompts``, ``ds``, ...) get a namespace of real stand-ins: tiny
random-weight transformers models, token-id lists, a ``datasets.Dataset``, TRL's own classes. Where the
README elides code with ``...``, ``SUBSTITUTIONS`` replaces exactly that text, once, with the reason.

After each block its results are checked against the block's comments (shapes, dtypes, what is zero,
what carries gradients) and against float64 references computed with plain torch/transformers. The two
quick-start commands are checked against ``.ci/run``.
"""

from __future__ import annotations

import copy
import math
import re
import shlex
import warnings
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

from readme_fixtures import (CI_RUN, README, ROOT, Block, code_blocks, padded_pairs, preference_examples,
                             reference_pair_logps, run_block, substitute)

BLOCKS = code_blocks(README.read_text(encoding="utf-8"), "python")

# heading -> (old, new, why): the README's deliberate ellipses, made concrete. Nothing else is changed.
SUBSTITUTIONS: dict[str, list[tuple[str, str, str]]] = {
    "Use it with a transformers model": [
        ("for ...]", "for chosen, rejected in response_pairs]",
         "the README elides the loop over the reader's data; response_pairs holds each example's "
         "(chosen, rejected) token-id lists"),
    ],
    "Drop-in for existing trainers": [
        ("DPOConfig(...)", "DPOConfig(**dpo_args)",
         "the README elides the reader's training arguments; dpo_args is a 2-step CPU run of a tiny batch"),
    ],
}


def _promised(block: Block, *phrases: str) -> None:
    """The README comments whose contracts a case checks are still the README's words (edit the case when
    they change)."""
    for phrase in phrases:
        assert phrase in block.source, f"README.md line {block.line}: the block no longer says {phrase!r}"


def _tiny_lm(seed: int):
    pytest.importorskip("transformers")
    from integrations.tiny_models import tiny_causal_lm

    return tiny_causal_lm("llama", dtype=torch.float32, seed=seed)


def _vocab(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def _dpo_z(policy: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    """``(B,)`` float64 DPO logits ``beta * ((pi_w - ref_w) - (pi_l - ref_l))`` of ``(B, 2)`` sequence scores
    (Rafailov et al., 2023, "Direct Preference Optimization"); the loss is ``mean(-log sigmoid(z))``."""
    policy, ref = policy.double(), ref.double()
    return beta * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1]))


def _assert_dpo_loss(loss: torch.Tensor, policy: torch.Tensor, ref: torch.Tensor, beta: float) -> None:
    want = -F.logsigmoid(_dpo_z(policy, ref, beta)).mean()
    got = float(loss.detach())
    assert math.isclose(got, float(want), rel_tol=1e-5, abs_tol=1e-6), (got, float(want))


# ------------------------------------------------------------------------------------------------ The op

def case_op(block: Block, tmp_path, monkeypatch, capsys) -> None:
    _promised(block, "(2, 512) float32", "prompt tokens: no work, no gradient", "all differentiable")
    torch.manual_seed(0)  # the block draws its inputs with torch.randn / randint
    ns: dict[str, Any] = {}
    values = run_block(block.source, ns, first_line=block.line)
    hidden, lm_head, labels = ns["hidden"], ns["lm_head"], ns["labels"]
    lead, valid = labels.shape, labels != -100
    n_prompt = int((~valid[0]).sum())

    # `(2, 512) float32`, and prompt tokens give 0 (no work)
    logps = ns["logps"]
    assert logps.shape == lead and logps.dtype == torch.float32
    assert bool((logps[~valid] == 0).all())

    # float64 reference on a sample of completion rows (the full float64 logit matrix would be slow)
    rows = torch.nonzero(valid)[::7]
    h64 = hidden.detach()[rows[:, 0], rows[:, 1]].double()
    z64 = h64 @ lm_head.detach().double().T
    y = labels[rows[:, 0], rows[:, 1]]

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.detach()[rows[:, 0], rows[:, 1]].double()

    torch.testing.assert_close(pick(logps), torch.log_softmax(z64, -1).gather(-1, y[:, None])[:, 0],
                               rtol=1e-4, atol=2e-3)

    # the bare expression `out.logprobs, out.entropy, out.lse, out.log_sum_p2`: all differentiable
    out = ns["out"]
    [shown] = _line_values(block, values, "out.logprobs")
    fields = dict(zip(("logprobs", "entropy", "lse", "log_sum_p2"), shown))
    zt = z64 / 0.7
    logp_t = torch.log_softmax(zt, -1)
    want = {"logprobs": logp_t.gather(-1, y[:, None])[:, 0], "entropy": -(logp_t.exp() * logp_t).sum(-1),
            "lse": torch.logsumexp(zt, -1), "log_sum_p2": torch.logsumexp(2 * logp_t, -1)}
    for name, value in fields.items():
        assert value is getattr(out, name)
        assert value.shape == lead and value.dtype == torch.float32 and value.requires_grad, name
        torch.testing.assert_close(pick(value), want[name], rtol=1e-4, atol=2e-3, msg=name)
    grad, = torch.autograd.grad(sum(v.sum() for v in fields.values()), hidden)
    assert bool((grad[:, :n_prompt] == 0).all()), "prompt tokens must get no gradient"
    assert bool(grad[:, n_prompt:].abs().sum(-1).gt(0).all())

    # the block's own float32 logits, in float64: cross-entropy with smoothing and z-loss, selective log-softmax
    logits64 = ns["logits"].detach().double()
    lse = torch.logsumexp(logits64, -1)
    ce = F.cross_entropy(logits64.flatten(0, 1), labels.flatten(), label_smoothing=0.1)
    want_loss = ce + 1e-4 * lse[valid].square().mean()
    assert ns["loss"].dim() == 0 and ns["loss"].dtype == torch.float32 and ns["loss"].requires_grad
    got = float(ns["loss"].detach())
    assert math.isclose(got, float(want_loss), rel_tol=1e-5), (got, float(want_loss))
    from_logits = ns["logps_from_logits"]
    assert from_logits.shape == lead
    want_sel = torch.log_softmax(logits64, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(from_logits.detach()[valid].double(), want_sel[valid], rtol=1e-5, atol=1e-4)


def _line_values(block: Block, values: list[tuple[int, Any]], prefix: str) -> list[Any]:
    """The values of the block's bare expression statements on the README line that starts with ``prefix``."""
    lines = block.source.splitlines()
    numbers = {line for line, _ in values if lines[line - block.line].strip().startswith(prefix)}
    assert len(numbers) == 1, f"expected one README line of bare expressions starting with {prefix!r}, found {len(numbers)}"
    return [v for line, v in values if line in numbers]


# --------------------------------------------------------------------------------- prefix sharing (HF)

def case_prefix(block: Block, tmp_path, monkeypatch, capsys) -> None:
    _promised(block, "(in place)", "several prompts per row", "(n_responses,) float32 sequence log-probs",
              "(E, K): column 0 chosen, 1 rejected", "tokens before/after sharing, ratio, padding, truncation")
    model = _tiny_lm(seed=0)
    model64 = copy.deepcopy(model).double()
    examples = preference_examples(4, _vocab(model), seed=3)
    ns: dict[str, Any] = {
        "model": model,
        "prompts": [ex["prompt_ids"] for ex in examples],
        "response_pairs": [(ex["chosen_ids"], ex["rejected_ids"]) for ex in examples],
    }
    run_block(substitute(block.source, SUBSTITUTIONS[block.heading]), ns, first_line=block.line)

    assert ns["model"] is model and model.config._attn_implementation == "pygpo_prefix"  # in place
    batch = ns["batch"]
    assert batch.input_ids.shape[0] == 1  # max_tokens=4096: all four examples share one row
    logps = ns["logps"]
    assert logps.shape == (2 * len(examples),) and logps.dtype == torch.float32  # (n_responses,) float32
    pairs = ns["pairs"]
    assert pairs.shape == (len(examples), 2)  # (E, K): column 0 chosen, 1 rejected
    torch.testing.assert_close(pairs.double(), reference_pair_logps(model64, examples), rtol=1e-5, atol=1e-4)

    printed = capsys.readouterr().out
    for word in ("tokens_unshared", "tokens_shared", "ratio", "padding", "truncated"):
        assert word in printed, (word, printed)
    p = [len(ex["prompt_ids"]) for ex in examples]
    r = [len(ex["chosen_ids"]) + len(ex["rejected_ids"]) for ex in examples]
    assert math.isclose(batch.stats().ratio, sum(2 * a + b for a, b in zip(p, r)) / sum(a + b for a, b in zip(p, r)))


# ------------------------------------------------------------------------------------------------ Losses

def case_losses(block: Block, tmp_path, monkeypatch, capsys) -> None:
    _promised(block, "(B, 2) sequence log-probs [chosen, rejected]")
    ns: dict[str, Any] = {}
    values = run_block(block.source, ns, first_line=block.line)
    policy, ref = ns["policy"].double(), ns["ref"].double()
    lengths = torch.tensor([[20, 31], [9, 12]], dtype=torch.float64)

    [(loss, per_example, margins)] = _line_values(block, values, "out.loss")
    _assert_dpo_loss(loss, policy, ref, beta=0.1)
    assert per_example.shape == (2,)
    want_margins = _dpo_z(policy, ref, 0.1).mean()
    assert math.isclose(float(margins), float(want_margins), rel_tol=1e-5)

    # SimPO (Meng et al., 2024): -log sigmoid(beta * (pi_w/|y_w| - pi_l/|y_l|) - gamma)
    [simpo] = _line_values(block, values, 'pygpo.preference_loss("simpo"')
    z = 2.0 * (policy[:, 0] / lengths[:, 0] - policy[:, 1] / lengths[:, 1]) - 0.5
    assert math.isclose(float(simpo.loss), float(-F.logsigmoid(z).mean()), rel_tol=1e-5)

    # DPO + 0.2 * SFT, the SFT term the NLL per chosen token over the batch (RPO, Pang et al., 2024)
    [combo] = _line_values(block, values, "pygpo.preference_loss({")
    dpo = -F.logsigmoid(_dpo_z(policy, ref, 0.1)).mean()
    sft = -policy[:, 0].sum() / lengths[:, 0].sum()
    assert math.isclose(float(combo.loss), float(dpo + 0.2 * sft), rel_tol=1e-5)

    names, formula = _line_values(block, values, "pygpo.losses.names()")
    assert {"dpo", "ipo", "simpo", "sft"} <= set(names)
    assert f"{len(names)} registry keys" in block.intro, "the section's count of registry keys"
    assert isinstance(formula, str) and "beta" in formula


# ---------------------------------------------------------------------------- The fused preference loss

def _fused_namespace(n_examples: int = 3) -> tuple[dict[str, Any], dict[str, Any]]:
    """The names the fused-loss block assumes, and the float64 references of their pairs."""
    model, ref_model = _tiny_lm(seed=0), _tiny_lm(seed=1)
    examples = preference_examples(n_examples, _vocab(model), seed=5)
    input_ids, mask, prompt_or_padding = padded_pairs(examples)
    ns = {"model": model, "ref_model": ref_model, "input_ids": input_ids, "mask": mask,
          "prompt_or_padding": prompt_or_padding}
    refs = {"examples": examples,
            "policy": reference_pair_logps(copy.deepcopy(model).double(), examples),
            "ref": reference_pair_logps(copy.deepcopy(ref_model).double(), examples),
            "lengths": torch.tensor([[len(ex["chosen_ids"]), len(ex["rejected_ids"])] for ex in examples])}
    return ns, refs


def _run_fused_block(block: Block) -> tuple[dict[str, Any], dict[str, Any]]:
    ns, refs = _fused_namespace()
    run_block(block.source, ns, first_line=block.line)
    return ns, refs


def _commented_metrics(block: Block) -> list[str]:
    """The metric names the comment after ``out.metrics`` lists (up to its parenthesis)."""
    lines = block.source.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("out.metrics"))
    comment = [lines[start].split("#", 1)[1]]
    comment += [line.split("#", 1)[1] for line in lines[start + 1:] if line.lstrip().startswith("#")][:1]
    text = " ".join(comment).split("(", 1)[0]
    return [name.strip() for name in text.split(",") if name.strip()]


def case_fused(block: Block, tmp_path, monkeypatch, capsys) -> None:
    _promised(block, "(2B, T-1, D), no logits", "chosen rows, then rejected", "(B, K) sequence scores and token counts")
    ns, refs = _run_fused_block(block)
    out, b = ns["out"], len(refs["examples"])
    assert ns["hidden"].shape[:2] == (2 * b, ns["input_ids"].shape[1] - 1)  # (2B, T-1, D)
    for name in ("policy_logps", "ref_logps", "lengths"):
        assert getattr(out, name).shape == (b, 2), name  # (B, K)
    torch.testing.assert_close(out.policy_logps.detach().double(), refs["policy"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.ref_logps.detach().double(), refs["ref"], rtol=1e-5, atol=1e-4)
    assert torch.equal(out.lengths.long(), refs["lengths"])
    _assert_dpo_loss(out.loss, refs["policy"], refs["ref"], beta=0.1)

    # out.loss.backward() reached the policy (lm_head and body), not the frozen reference
    model, ref_model = ns["model"], ns["ref_model"]
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and bool(torch.isfinite(grad).all()) and bool(grad.abs().sum() > 0), name
    assert all(p.grad is None for p in ref_model.parameters())

    listed = _commented_metrics(block)
    assert len(listed) >= 8, listed
    for name in listed:
        have = [k for k in out.metrics if k == name or (name.endswith("*") and k.startswith(name[:-1]))]
        assert have, (name, sorted(out.metrics))


# ---------------------------------------------------------------------------------------- Reference cache

def case_cache(block: Block, tmp_path, monkeypatch, capsys) -> None:
    """The block continues the fused-loss example (its ``loss_fn``, ``hidden``, ``labels``), so it runs in
    the namespace that block leaves, with ``weight`` (the policy's lm_head weight), ``examples`` (the
    batch's token ids) and ``batch_indices`` (the batch's rows of ``examples``) added."""
    _promised(block, "computed once, then reused")
    fused = _only_block("The fused preference loss")
    ns, refs = _run_fused_block(fused)
    monkeypatch.chdir(tmp_path)  # the block writes "ref.safetensors" in the working directory
    before = ns["out"]
    ns.update(weight=ns["model"].get_output_embeddings().weight, examples=refs["examples"],
              batch_indices=list(range(len(refs["examples"]))))
    run_block(block.source, ns, first_line=block.line)

    cache, out = ns["cache"], ns["out"]
    assert (tmp_path / "ref.safetensors").is_file()
    seq = cache.sequence_logps(ns["batch_indices"])
    assert seq.shape == (len(refs["examples"]), 2) and seq.dtype == torch.float32
    torch.testing.assert_close(seq.double(), refs["ref"], rtol=1e-5, atol=1e-4)
    # the cached reference gives the loss the reference model's hidden states gave
    torch.testing.assert_close(out.ref_logps.detach(), before.ref_logps.detach(), rtol=1e-5, atol=1e-4)
    assert math.isclose(float(out.loss.detach()), float(before.loss.detach()), rel_tol=1e-5, abs_tol=1e-6)

    # "computed once, then reused": a second open reads the file instead of rewriting it
    stamp = (tmp_path / "ref.safetensors").stat().st_mtime_ns
    run_block(block.source, ns, first_line=block.line)
    assert (tmp_path / "ref.safetensors").stat().st_mtime_ns == stamp
    torch.testing.assert_close(ns["cache"].sequence_logps(ns["batch_indices"]), seq)


# ----------------------------------------------------------------------------------------------- TRL

def case_trl(block: Block, tmp_path, monkeypatch, capsys) -> None:
    trl = pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from integrations import trl_setup

    model = trl_setup.model(seed=0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ns: dict[str, Any] = {
        "model": model, "ref_model": trl_setup.model(seed=1), "ds": trl_setup.dataset(),
        "tokenizer": trl_setup.tokenizer(), "DPOConfig": trl.DPOConfig,
        "dpo_args": dict(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=2,
                         learning_rate=1e-2, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                         seed=0, dataloader_num_workers=0, disable_tqdm=True, bf16=False),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_block(substitute(block.source, SUBSTITUTIONS[block.heading]), ns, first_line=block.line)
    fallback = [str(w.message) for w in caught if "FusedDPOTrainer" in str(w.message)]
    assert not fallback, fallback

    # the paragraph above the block: "the logs keep TRL's metric names (`mean_token_accuracy` included)"
    assert "(`mean_token_accuracy` included)" in " ".join(block.intro.split())
    trainer = ns["trainer"]
    assert trainer.pygpo_loss is not None, trainer.pygpo_fallback_reason
    assert trainer.pygpo_prefix_sharing and model.config._attn_implementation == "pygpo_prefix"
    assert trainer.state.global_step == 2
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for log in logs:
        for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                     "mean_token_accuracy"):
            assert math.isfinite(log[name]), (name, log)
    assert any(not torch.equal(p.detach(), start[n]) for n, p in model.named_parameters()), "no parameter moved"


CASES: dict[str, Callable[..., None]] = {
    "The op": case_op,
    "Use it with a transformers model": case_prefix,
    "Losses": case_losses,
    "The fused preference loss": case_fused,
    "Reference cache": case_cache,
    "Drop-in for existing trainers": case_trl,
}


def _only_block(heading: str) -> Block:
    found = [b for b in BLOCKS if b.heading == heading]
    assert len(found) == 1, f"expected one python block under the README heading {heading!r}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("block", BLOCKS, ids=[b.test_id for b in BLOCKS])
def test_readme_python_block(block: Block, tmp_path, monkeypatch, capsys):
    case = CASES.get(block.heading)
    assert case is not None, (f"README.md line {block.line} (under {block.heading!r}) has a python block this test "
                              "does not know: add a case for it to CASES")
    _only_block(block.heading)
    case(block, tmp_path, monkeypatch, capsys)


def test_every_case_has_its_block():
    headings = [b.heading for b in BLOCKS]
    stale = [h for h in CASES if h not in headings]
    assert not stale, f"CASES names README headings without a python block: {stale}"
    assert set(SUBSTITUTIONS) <= set(CASES)


# ---------------------------------------------------------------------------------------------- quick start

def _commands(line: str) -> list[str]:
    return [part.strip() for part in line.split("&&")]


def test_quick_start_agrees_with_ci_run():
    """The quick start's two commands share one install, the test command is the one `.ci/run` ends with,
    after the same installs, and `pygpo train` is an installed console script."""
    text = README.read_text(encoding="utf-8")
    bash = [b for b in code_blocks(text, "bash") if b.heading == "Quick start"]
    assert len(bash) == 2, [b.source for b in bash]
    train, tests = (_commands(b.source.strip()) for b in bash)
    assert "`.ci/run`" in bash[1].intro, "the second quick-start command is introduced as what .ci/run runs"
    assert train[:-1] == tests[:-1], (train, tests)
    assert train[-1] == "pygpo train"

    ci = [line.strip() for line in CI_RUN.read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == tests[-1], f".ci/run ends with {ci[-1]!r}, the README's test command is {tests[-1]!r}"
    positions = []
    for install in tests[:-1]:
        assert install in ci, f"the README's install step {install!r} is not a line of .ci/run"
        positions.append(ci.index(install))
    assert positions == sorted(positions), "README and .ci/run install in different orders"

    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r"^pygpo\s*=\s*\"pygpo\.__main__:main\"", pyproject, re.M), "no `pygpo` console script"
    extra = re.search(r'-e\s+"\.\[(\w+)\]"', " ".join(tests))
    assert extra and re.search(rf"^{extra.group(1)}\s*=\s*\[", pyproject, re.M), f"no such extra in {tests}"
    assert shlex.split(tests[-1])[:3] == ["python", "-m", "pytest"]

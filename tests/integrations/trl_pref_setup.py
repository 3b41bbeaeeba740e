"""Runs of TRL's experimental paired trainers (CPO, ORPO) and their fused drop-ins on the tiny setup of trl_setup
(word-level tokenizer, prompts of 2-7 and completions of 1-6 words, random Llama; trl_kto_setup's softcapped
Gemma-2), and the comparison of two runs."""

from __future__ import annotations

import math
import os
import warnings

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the experimental-import notice, once per import

import trl_setup  # noqa: E402
from trl_kto_setup import softcap_model  # noqa: E402
from trl_setup import model, tokenizer  # noqa: E402

__all__ = ["assert_same_eval", "assert_same_run", "compare", "compare_fallback", "lm_head_calls", "model", "softcap_model", "tokenizer", "train"]

TOL = dict(rel_tol=2e-4, abs_tol=2e-5)


def train(cls, config_cls, out_dir, *, make_model=model, dataset=None, trainer_kwargs=None, **overrides):
    """``(logs with a loss, trained parameters, trainer)`` of 3 SGD steps of ``cls`` on 12 rows in batches of 4."""
    trainer = cls(model=make_model(), args=trl_setup.config(out_dir, config_cls=config_cls, **overrides),
                  train_dataset=trl_setup.dataset() if dataset is None else dataset,
                  processing_class=tokenizer(), **(trainer_kwargs or {}))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return logs, params, trainer


def assert_same_run(logs, base_logs, params, base_params, *, steps=3):
    """The same logged metric names and values step by step, and the same trained parameters (float32 tolerance)."""
    assert len(logs) == len(base_logs) == steps
    for got, want in zip(logs, base_logs):
        assert set(got) == set(want)
        for name, value in want.items():
            assert math.isclose(got[name], value, **TOL), (name, got[name], value)
    assert params and params.keys() == base_params.keys()
    for name, p in params.items():
        torch.testing.assert_close(p, base_params[name], rtol=2e-4, atol=2e-5, msg=name)


def assert_same_eval(got: dict, want: dict) -> None:
    """``trainer.evaluate`` results: the same names (timings aside) and values."""
    timing = lambda k: "runtime" in k or "per_second" in k  # noqa: E731
    assert {k for k in got if not timing(k)} == {k for k in want if not timing(k)}
    for name, value in want.items():
        if not timing(name):
            assert math.isclose(got[name], value, **TOL), (name, got[name], value)


class lm_head_calls:
    """Counts the forwards of ``model``'s lm_head inside the block (the fused path never runs it)."""

    def __init__(self, model):
        self.head, self.count = model.get_output_embeddings(), 0

    def __enter__(self):
        self.handle = self.head.register_forward_hook(lambda *_: setattr(self, "count", self.count + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def compare(base_cls, fused_cls, config_cls, tmp_path, *, make_model=model, trainer_kwargs=None, **overrides):
    """TRL's run and the fused one on the fused path, then evaluation on held-out rows, during which the fused
    trainer never runs the lm_head. Returns TRL's logs and the fused trainer."""
    kwargs = dict(make_model=make_model, trainer_kwargs={"eval_dataset": trl_setup.dataset(n=8, seed=1),
                                                         **(trainer_kwargs or {})}, **overrides)
    base_logs, base_params, base = train(base_cls, config_cls, tmp_path / "trl", **kwargs)
    logs, params, trainer = train(fused_cls, config_cls, tmp_path / "pygpo", **kwargs)
    assert trainer.pygpo_loss is not None, trainer.pygpo_fallback_reason
    assert_same_run(logs, base_logs, params, base_params)
    with lm_head_calls(base.model) as trl_calls, lm_head_calls(trainer.model) as fused_calls:
        assert_same_eval(trainer.evaluate(), base.evaluate())
    assert fused_calls.count == 0 and trl_calls.count > 0
    return base_logs, trainer


def compare_fallback(base_cls, fused_cls, config_cls, tmp_path, **overrides):
    """TRL's run and the fused trainer's, which must be the same; returns the fused trainer and the messages of
    the warnings it raised."""
    base_logs, base_params, _ = train(base_cls, config_cls, tmp_path / "trl", **overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs, params, trainer = train(fused_cls, config_cls, tmp_path / "pygpo", **overrides)
    assert_same_run(logs, base_logs, params, base_params)
    return trainer, [str(w.message) for w in caught]

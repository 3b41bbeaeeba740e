"""A tiny real TRL KTO setup: unpaired dataset (mixed labels, varying lengths), KTOConfig; model and tokenizer
come from trl_setup."""

from __future__ import annotations

import random

import trl_setup
from trl_setup import WORDS, model, tokenizer

__all__ = ["WORDS", "config", "dataset", "model", "softcap_model", "tokenizer"]


def dataset(n: int = 12, seed: int = 0):
    """Unpaired rows ``{prompt, completion, label}``: prompts of 2-7 words, completions of 1-6 (TRL appends EOS),
    desirable and undesirable labels mixed (every batch of 4 has both)."""
    from datasets import Dataset

    rng = random.Random(seed)
    phrase = lambda a, b: " ".join(rng.choice(WORDS) for _ in range(rng.randint(a, b)))  # noqa: E731
    labels = [True, False, True, True, False, True, False, False, True, False, False, True]
    # completions start with a space: TRL tokenizes prompt + completion as one string
    rows = [{"prompt": phrase(2, 7), "completion": " " + phrase(1, 6), "label": labels[i % len(labels)]}
            for i in range(n)]
    return Dataset.from_list(rows)


def config(out_dir, **overrides):
    from trl import KTOConfig

    return trl_setup.config(out_dir, config_cls=KTOConfig, **overrides)


def softcap_model(seed: int = 0):
    """A tiny random Gemma-2 (final logit softcapping, tied embeddings) on trl_setup's vocabulary, its weights
    large enough (initializer_range) that the softcap bends the logits."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.Gemma2Config(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                          final_logit_softcapping=2.0, query_pre_attn_scalar=8, sliding_window=64,
                          initializer_range=0.5,
                          pad_token_id=0, eos_token_id=1, bos_token_id=None, attn_implementation="eager")
    return tf.Gemma2ForCausalLM(cfg)

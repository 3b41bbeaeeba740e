"""A tiny real TRL setup for the adapter tests: word-level tokenizer, preference dataset, random Llama."""

from __future__ import annotations

import random

import torch

WORDS = [f"w{i}" for i in range(60)]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def dataset(n: int = 12, seed: int = 0):
    from datasets import Dataset

    rng = random.Random(seed)
    phrase = lambda a, b: " ".join(rng.choice(WORDS) for _ in range(rng.randint(a, b)))  # noqa: E731
    # completions start with a space: TRL tokenizes prompt + completion as one string
    rows = [{"prompt": phrase(2, 7), "chosen": " " + phrase(1, 6), "rejected": " " + phrase(1, 6)} for _ in range(n)]
    return Dataset.from_list(rows)


def model(seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return tf.LlamaForCausalLM(cfg)


def config(out_dir, *, config_cls=None, **overrides):
    """A tiny CPU run's config: ``trl.DPOConfig`` unless ``config_cls`` names another TRL config class."""
    from trl import DPOConfig

    # SGD: parameters after a few steps compare gradients linearly (Adam would amplify rounding near g = 0)
    base = dict(output_dir=str(out_dir), per_device_train_batch_size=4, max_steps=3, learning_rate=0.5, optim="sgd",
                logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                dataloader_num_workers=0, disable_tqdm=True, beta=0.3, bf16=False)
    base.update(overrides)
    return (config_cls or DPOConfig)(**base)


def trained_record(trainer, model) -> dict:
    """Train, then what a DDP test compares across trainers and ranks: the loss logs, the parameters, the wrapper
    TRL put around the model, and whether the fused path ran."""
    trainer.train()
    return {
        "logs": [h for h in trainer.state.log_history if "loss" in h],
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "wrapped": type(trainer.model_wrapped).__name__,
        "fused": getattr(trainer, "pygpo_loss", None) is not None,
    }

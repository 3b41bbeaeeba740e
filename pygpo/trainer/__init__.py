"""The thin trainer's building blocks: configuration, data, byte tokenizer and the demo task.

    from pygpo.trainer import load_config, ByteTokenizer, load_preference_data, BatchIterator

``load_config`` reads ``pygpo train``'s options (:class:`TrainConfig`); :mod:`.data` reads, validates
and tokenizes preference data; :mod:`.demo_task` generates the shipped sorting task and scores
completions.
"""

from .config import ConfigError, TrainConfig, config_help, load_config
from .data import (
    BatchIterator,
    DatasetRowError,
    DataSummary,
    iter_batches,
    load_preference_data,
    load_train_eval,
    read_rows,
    tokenize_rows,
    train_eval_split,
)
from .tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "BatchIterator",
    "ByteTokenizer",
    "ConfigError",
    "DataSummary",
    "DatasetRowError",
    "TrainConfig",
    "config_help",
    "iter_batches",
    "load_config",
    "load_preference_data",
    "load_train_eval",
    "load_tokenizer",
    "read_rows",
    "tokenize_rows",
    "train_eval_split",
]

"""Prefix sharing: one forward pass per prompt for all of its responses.

A DPO-style batch pushes every prompt through the model once per response. Packing
``[prompt | response_1 | ... | response_K]`` into one row, with an attention mask that keeps responses
apart and position ids that restart at the prompt length for every response, computes the prompt once
and gives every response exactly the log-probabilities of a separate ``prompt + response`` forward
("Accelerating Direct Preference Optimization with Prefix Sharing", Wang & Hegde, 2024).

* :func:`pack` -> :class:`PrefixBatch` (``input_ids``, ``position_ids``, :class:`PrefixLayout`, targets)
* :func:`prefix_attention` (torch and block-sparse Triton backends)
* :func:`build_block_map`: the tile lists the Triton kernels walk
* ``pygpo.integrations.transformers.enable_prefix_sharing(model)`` wires it into a transformers model
"""

from .attention import prefix_attention
from .batch import PrefixBatch, PrefixStats
from .blocks import BlockMap, build_block_map
from .layout import PrefixLayout
from .pack import pack

__all__ = [
    "BlockMap",
    "PrefixBatch",
    "PrefixLayout",
    "PrefixStats",
    "build_block_map",
    "pack",
    "prefix_attention",
]

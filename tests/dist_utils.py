"""Helpers for the multi-process (gloo) tests."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port on localhost that is free now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_worker(rank: int, port: int, world: int) -> None:
    """A spawned worker's process-group environment (localhost), one torch thread, quiet logging."""
    import logging

    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)

"""FusedDPOTrainer under 2-process gloo DDP: gradients are synchronised, so parameters stay identical across ranks.

Each rank trains on its own shard of the data; if the fused loss bypassed DDP's forward, the ranks'
gradients would stay local and their parameters would drift apart after the first step.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from dist_utils import free_port, init_worker

pytest.importorskip("trl")

WORLD = 2


def _worker(rank: int, port: int, out_dir: str) -> None:
    init_worker(rank, port, WORLD)
    import trl_setup
    from pygpo.integrations.trl import FusedDPOTrainer

    model = trl_setup.model()
    trainer = FusedDPOTrainer(
        model=model, ref_model=trl_setup.model(seed=1),
        args=trl_setup.config(os.path.join(out_dir, "run"), max_steps=2, per_device_train_batch_size=2,
                              ddp_backend="gloo"),
        train_dataset=trl_setup.dataset(n=8), processing_class=trl_setup.tokenizer(),
    )
    assert trainer.pygpo_loss is not None
    assert isinstance(trainer.model_wrapped, torch.nn.Module)
    trainer.train()
    wrapped = type(trainer.model_wrapped).__name__
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save({"params": params, "wrapped": wrapped}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_parameters_identical_across_ranks(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["wrapped"] == "DistributedDataParallel"
    initial = {n: p.detach() for n, p in __import__("trl_setup").model().named_parameters()}
    moved = 0
    for name, p in r0["params"].items():
        torch.testing.assert_close(p, r1["params"][name], rtol=0, atol=0, msg=name)
        moved += int(not torch.equal(p, initial[name]))
    assert moved > 0  # training did change the parameters

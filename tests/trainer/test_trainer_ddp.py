"""``pygpo train`` under 2-process gloo DDP follows the loss trajectory of 1 process with the same global batch.

The DDP run trains DPO + SFT: the SFT term is a token mean over the global batch's chosen tokens, which the
ranks match only by sharing the step's mean chosen length (each rank alone sees other lengths)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from dist_utils import free_port

from pygpo.versions import fsdp2_on_cpu_problem

ARGS = ["--demo_model.hidden_size", "32", "--demo_model.intermediate_size", "64", "--batch_size", "8",
        "--generate_eval_size", "0", "--eval_every", "0", "--log_every", "1", "--max_steps", "4", "--eval_size", "8"]


DPO_SFT = ["--loss", "dpo+sft", "--loss_weights.sft", "0.5"]


def _sorting_rows(path) -> str:
    """24 digit-sorting pairs of 1 to 8 digits: the ranks' shares of a batch differ in chosen length."""
    rows = []
    for i in range(24):
        digits = "".join(str((7 * i + 3 * j) % 10) for j in range(1 + i % 8))
        rows.append({"prompt": f"sort {digits}=", "chosen": "".join(sorted(digits)),
                     "rejected": "".join(sorted(digits))[::-1]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _worker(rank: int, port: int, out: str, data: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    from pygpo.trainer import load_config
    from pygpo.trainer.loop import train

    train(load_config(None, [*ARGS, *DPO_SFT, "--dataset", data, "--output_dir", out, "--num_threads", "1"]))


def _losses(path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_two_processes_match_one(tmp_path):
    from pygpo.trainer import load_config
    from pygpo.trainer.loop import train

    data = _sorting_rows(tmp_path / "data.jsonl")
    train(load_config(None, [*ARGS, *DPO_SFT, "--dataset", data, "--output_dir", str(tmp_path / "one")]))
    mp.start_processes(_worker, args=(free_port(), str(tmp_path / "two"), data), nprocs=2, join=True,
                       start_method="spawn")
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (one, two)
    assert one[-1] < one[0]  # it trained


def _fsdp_worker(rank: int, port: int, out: str, extra: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    from pygpo.trainer import load_config
    from pygpo.trainer.loop import train

    train(load_config(None, [*ARGS, "--output_dir", out, "--num_threads", "1", "--fsdp", "true", *extra]))


@pytest.mark.skipif(fsdp2_on_cpu_problem() is not None, reason=str(fsdp2_on_cpu_problem()))
def test_fsdp2_matches_one_process_and_resumes(tmp_path):
    from safetensors.torch import load_file

    from pygpo.trainer import load_config
    from pygpo.trainer.loop import train

    train(load_config(None, [*ARGS, "--output_dir", str(tmp_path / "one")]))
    mp.start_processes(_fsdp_worker, args=(free_port(), str(tmp_path / "fsdp"), ["--save_every", "2"]), nprocs=2,
                       join=True, start_method="spawn")
    one, fsdp = _losses(tmp_path / "one"), _losses(tmp_path / "fsdp")
    assert len(fsdp) == 4
    for a, b in zip(one, fsdp):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (one, fsdp)
    # resume the sharded run from its step-2 checkpoint: the same final weights
    mp.start_processes(_fsdp_worker, args=(free_port(), str(tmp_path / "fsdp2"),
                                           ["--resume", str(tmp_path / "fsdp" / "checkpoint-2")]),
                       nprocs=2, join=True, start_method="spawn")
    a, b = load_file(str(tmp_path / "fsdp" / "checkpoint-4" / "model.safetensors")), load_file(
        str(tmp_path / "fsdp2" / "checkpoint-4" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)

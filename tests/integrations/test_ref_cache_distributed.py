"""pygpo.fingerprint and the trainer's reference cache in 2 gloo processes on CPU.

* FSDP2: every ``DTensor`` reports ``data_ptr() == 0``, so sharded parameters must not be taken for
  aliases of each other, and their gathers (collectives) must be issued in the same order on every rank:
  the sharded fingerprint equals the unsharded one (hashing threads > 1), and changes when only a later
  parameter of the same shape changes.
* ``pygpo train --reference cache`` under torchrun: rank 0 computes the file while the other waits and
  then loads it; a refused file stops both ranks (neither waits forever).

One spawn runs every scenario (process start and imports dominate the time).
"""

from __future__ import annotations

import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from tiny_models import tiny_causal_lm  # noqa: E402

WORLD = 2
TRAIN_ARGS = ["--demo_model.hidden_size", "32", "--demo_model.intermediate_size", "64", "--batch_size", "4",
              "--generate_eval_size", "0", "--eval_every", "0", "--log_every", "1", "--max_steps", "1",
              "--eval_size", "4", "--num_threads", "1", "--reference", "cache"]
PAIRS = 16  # the cache is computed over every train and held-out pair: few keep it quick


def _pair(i: int) -> str:
    """One row of the demo's sorting task (prompt "sort <digits>=", the sorted digits chosen, a near miss
    rejected) as a JSON line."""
    digits = [str((7 * i + 3 * k) % 10) for k in range(4 + i % 3)]
    chosen = "".join(sorted(digits))
    rejected = chosen[1] + chosen[0] + chosen[2:] if chosen[0] != chosen[1] else chosen[:-1] + "0"
    return json.dumps({"prompt": f"sort {''.join(digits)}=", "chosen": chosen, "rejected": rejected}) + "\n"


def _fingerprints(model) -> tuple[str, str]:
    from pygpo.fingerprint import fingerprint_config, fingerprint_model

    return fingerprint_model(model, threads=4), fingerprint_config(model)


def _double_later_layer(model) -> None:
    """Scale layers.1's q_proj, whose shape, stride and dtype equal layers.0's (every rank its own shard)."""
    from torch.distributed.tensor import DTensor

    weight = model.model.layers[1].self_attn.q_proj.weight
    with torch.no_grad():
        (weight.to_local() if isinstance(weight, DTensor) else weight).mul_(2.0)


def _fsdp2(tied: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    plain = tiny_causal_lm("llama", tied=tied, dtype=torch.float32)
    unsharded = _fingerprints(plain)
    _double_later_layer(plain)
    unsharded_doubled = _fingerprints(plain)

    model = tiny_causal_lm("llama", tied=tied, dtype=torch.float32)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = [_fingerprints(model) for _ in range(3)]  # repeated: gathers out of order would abort or differ
    _double_later_layer(model)
    return {"unsharded": unsharded, "unsharded_doubled": unsharded_doubled, "sharded": sharded,
            "sharded_doubled": _fingerprints(model), "class": type(model).__name__}


def _trainer(rank: int, out: str) -> dict:
    """Open the cache through the trainer twice: fresh (rank 0 computes it), then with another model."""
    args = [*TRAIN_ARGS, "--dataset", os.path.join(out, "pairs.jsonl")]
    import pygpo.ref_cache as ref_cache
    from pygpo.trainer import load_config
    from pygpo.trainer.loop import Trainer

    computed = []
    real = ref_cache.compute_reference_cache

    def counted(*args, **kwargs):  # the real computation, counted per rank
        computed.append(rank)
        return real(*args, **kwargs)

    ref_cache.compute_reference_cache = counted
    try:
        trainer = Trainer(load_config(None, [*args, "--output_dir", os.path.join(out, "run")]))
        first = {"computed": len(computed), "responses": trainer.ref_cache.num_responses,
                 "sequence_logps": trainer.ref_cache.sequence_logps(list(range(4)))}
        cache_file = os.path.join(out, "run", "reference_cache.safetensors")
        try:  # a smaller model: the file is refused on rank 0
            Trainer(load_config(None, [*args, "--demo_model.hidden_size", "16", "--output_dir",
                                       os.path.join(out, "other"), "--reference_cache", cache_file]))
            refused = None
        except Exception as exc:
            refused = f"{type(exc).__name__}: {exc}"
    finally:
        ref_cache.compute_reference_cache = real
    return {**first, "refused": refused}


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, run in (("fsdp2", lambda: _fsdp2(False)), ("fsdp2_tied", lambda: _fsdp2(True)),
                          ("trainer", lambda: _trainer(rank, out))):
            try:
                results[name] = run()
            except Exception:  # reported per scenario by the tests
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    """Each scenario's results, one dict per rank."""
    # spawn, not fork: a child forked after the parent's OpenMP pool ran can deadlock in its first sgemm
    out = tmp_path_factory.mktemp("dist")
    (out / "pairs.jsonl").write_text("".join(_pair(i) for i in range(PAIRS)))
    mp.start_processes(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True, start_method="spawn")
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    return {name: [r[name] for r in ranks] for name in ranks[0]}


def _ok(results: list[dict]) -> list[dict]:
    """``results``, or the test fails with the traceback of every rank that raised."""
    raised = [f"rank {k}: {r['error']}" for k, r in enumerate(results) if "error" in r]
    if raised:
        pytest.fail("\n".join(raised))
    return results


@pytest.mark.parametrize("scenario", ["fsdp2", "fsdp2_tied"])
def test_sharded_fingerprint_equals_unsharded(runs, scenario):
    for res in _ok(runs[scenario]):
        assert res["class"] == "FSDPLlamaForCausalLM"  # the class FSDP2 swaps in: seen through
        assert res["sharded"] == [res["unsharded"]] * 3
        # weights change, config does not; every later same-shaped DTensor is hashed, not taken for an alias
        assert res["sharded_doubled"] == res["unsharded_doubled"]
        assert res["sharded_doubled"][0] != res["unsharded"][0]
        assert res["sharded_doubled"][1] == res["unsharded"][1]
    assert runs[scenario][0] == runs[scenario][1]


def test_trainer_rank0_computes_the_cache_and_the_other_loads_it(runs):
    r0, r1 = _ok(runs["trainer"])
    assert (r0["computed"], r1["computed"]) == (1, 0)
    assert r0["responses"] == r1["responses"] > 0
    assert torch.equal(r0["sequence_logps"], r1["sequence_logps"])


def test_trainer_refused_cache_stops_every_rank(runs):
    r0, r1 = _ok(runs["trainer"])
    assert r0["refused"].startswith("FingerprintMismatchError") and "model weights differ" in r0["refused"]
    assert "model config differs (" in r0["refused"] and "hidden_size: stored 32, current 16" in r0["refused"]
    assert r1["refused"].startswith("RuntimeError") and "failed on rank 0" in r1["refused"]

"""final_hidden_states + lm_head_of + fused_linear_logprobs under DDP and FSDP2, 2 gloo processes on CPU.

Every scenario runs one training step on its half of a global batch of 4 sequences and must give the
gradients of a single-process run of the whole batch that uses plain ``model(...).logits`` and
``log_softmax``; after one SGD step the parameters must agree across ranks. One spawn runs all
scenarios (process start and imports dominate the time).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pygpo.versions import fsdp2_on_cpu_problem

pytest.importorskip("transformers")

from tiny_models import random_ids, tiny_causal_lm  # noqa: E402

WORLD = 2
GLOBAL_BATCH, LENGTH = 4, 11
LR = 0.5
SCENARIOS = ("ddp", "ddp_find_unused", "ddp_bypassed", "fsdp2", "fsdp2_tied", "fsdp2_sharded_head",
             "fsdp2_resharded_root", "fsdp2_resharded_root_tied")


def _batch():
    ids = random_ids(GLOBAL_BATCH, LENGTH, seed=3)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # right padding on some rows
    mask[2, -2:] = 0
    return ids, mask


def _labels(ids, mask):
    labels = ids[:, 1:].clone()
    labels[mask[:, 1:] == 0] = -100
    return labels


def _tied(scenario: str) -> bool:
    return scenario.endswith("_tied")


def _reference_grads(tied: bool) -> dict[str, torch.Tensor]:
    """Single process, whole batch, plain logits: loss = -sum of valid token log-probs / GLOBAL_BATCH."""
    model = tiny_causal_lm("llama", tied=tied).train()
    ids, mask = _batch()
    labels = _labels(ids, mask)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    loss = -(logp * (labels != -100)).sum() / GLOBAL_BATCH
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


def _wrap(model, scenario: str):
    if scenario.startswith("ddp"):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, find_unused_parameters=scenario == "ddp_find_unused")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    if scenario == "fsdp2_sharded_head":
        fully_shard(model.lm_head, mesh=mesh)  # its forward never runs: lm_head_of gathers the DTensor
    # resharded root: the lm_head weight is a sharded DTensor again when lm_head_of reads it
    fully_shard(model, mesh=mesh, reshard_after_forward=scenario.startswith("fsdp2_resharded_root"))
    return model


def _step(scenario: str, rank: int) -> dict:
    from pygpo.integrations.hidden_states import decoder_body, final_hidden_states, lm_head_of

    model = tiny_causal_lm("llama", tied=_tied(scenario)).train()
    names = [n for n, _ in model.named_parameters()]
    wrapped = _wrap(model, scenario)
    ids, mask = _batch()
    part = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
    ids, mask = ids[part], mask[part]
    labels = _labels(ids, mask)
    if scenario == "ddp_bypassed":  # the body called directly: DDP's forward (and its reducer) never runs
        hidden = decoder_body(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    else:
        hidden = final_hidden_states(wrapped, ids, attention_mask=mask)
    head_sharded = _is_dtensor(model.lm_head.weight)
    head = lm_head_of(wrapped)
    logp = head.logprobs(hidden[:, :-1], labels)
    loss = -logp.sum() / ids.shape[0]
    loss.backward()
    params = dict(model.named_parameters())
    grads = {n: _full(params[n].grad).detach().clone() for n in names}
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(LR * p.grad)
    after = {n: _full(params[n].detach()).clone() for n in names}
    return {"grads": grads, "params": after, "head_sharded": head_sharded}


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for scenario in SCENARIOS:
            try:
                results[scenario] = _step(scenario, rank)
            except Exception as exc:  # reported per scenario by the tests
                results[scenario] = {"error": f"{type(exc).__name__}: {exc}"}
            dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def reference():
    return {tied: _reference_grads(tied) for tied in (False, True)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, reference):
    # spawn, not fork: a child forked after the parent's OpenMP pool ran deadlocks in its first sgemm
    # (seen in a full test run), whatever its own thread count.
    out = tmp_path_factory.mktemp("dist")
    mp.start_processes(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _result(runs, scenario):
    if scenario.startswith("fsdp2") and fsdp2_on_cpu_problem():
        pytest.skip(fsdp2_on_cpu_problem())
    for rank, res in enumerate(runs):
        if "error" in res[scenario]:
            pytest.fail(f"{scenario} rank {rank}: {res[scenario]['error']}")
    return [res[scenario] for res in runs]


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s != "ddp_bypassed"])
def test_gradients_match_single_process_logits(runs, reference, scenario):
    ref = reference[_tied(scenario)]
    for rank, res in enumerate(_result(runs, scenario)):
        assert set(res["grads"]) == set(ref)
        for name, g in res["grads"].items():
            torch.testing.assert_close(g, ref[name], rtol=1e-9, atol=1e-12, msg=f"rank {rank} grad of {name}")


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s != "ddp_bypassed"])
def test_parameters_identical_across_ranks_after_a_step(runs, scenario):
    r0, r1 = _result(runs, scenario)
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name


def test_bypassing_the_ddp_forward_leaves_gradients_rank_local(runs):
    """Why final_hidden_states routes through DDP's forward: calling the body directly skips the reducer."""
    r0, r1 = _result(runs, "ddp_bypassed")
    differing = [n for n in r0["grads"] if not torch.allclose(r0["grads"][n], r1["grads"][n])]
    assert differing, "gradients agreed across ranks without DDP's forward"


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s.startswith("fsdp2")])
def test_fsdp2_head_is_gathered_only_when_still_sharded(runs, scenario):
    """After the root's forward the lm_head weight is unsharded, unless the root reshards or the head is
    its own FSDP2 unit; then lm_head_of gathers the DTensor (the path whose gradients the tests check)."""
    expected = scenario in ("fsdp2_sharded_head", "fsdp2_resharded_root", "fsdp2_resharded_root_tied")
    assert [r["head_sharded"] for r in _result(runs, scenario)] == [expected] * WORLD

"""``train(cfg)``: the training loop of ``pygpo train``.

Each optimizer step takes ``grad_accum`` micro-batches of ``batch_size`` pairs (the global batch; under
``torchrun`` every rank takes its share of each micro-batch). A micro-batch's loss is the mean over its
pairs; it is weighted by its share of the step's pairs, so for a loss that is a mean of per-pair terms
the step's gradient is the mean over all of them whatever the split. A batch token-mean NLL term
(``NLL_mean`` of ``sft``, ``cpo``, ``orpo``) is a token mean over all of the step's chosen tokens on every
rank: each call gets the step's mean chosen length (``nll_mean_length``), so the micro-batches' terms
sum to it exactly whatever their lengths (held-out batches use their own). Stateful losses (``beta_dpo``,
``bco``, ``bco_pair``, ``group_robust``) update their statistics once per optimizer step, from the step's
first micro-batch; the later ones use the statistics without updating them (so ``grad_accum`` changes the
data an update sees, not how often the statistics move). Then: gradient clipping, AdamW, the LR schedule
(linear warmup, then constant / linear / cosine decay), the loss schedules (DPO-Shift's lambda via
``loss_schedule``: step ``s`` of ``total`` runs at progress ``s / (total - 1)``, so the first step takes
the start value and the last the end value), TR-DPO's reference sync, logging, evaluation and checkpoints.

``dtype: bf16`` is mixed precision: float32 parameters and optimizer state, forwards under
``torch.autocast(bfloat16)`` (:mod:`.models`).

Ctrl-C (SIGINT) does not cut a step in half: the handler only raises a flag, the loop finishes the current
optimizer step (with its logging, evaluation and checkpoint) and then saves a checkpoint whose weights,
optimizer, scheduler, loss state, RNG, data position and step counter all describe that step boundary,
so ``--resume`` continues exactly. A second Ctrl-C aborts at once without saving.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..fused import FusedPreferenceLoss
from ..integrations.hidden_states import lm_head_of
from ..integrations.transformers import enable_prefix_sharing
from . import demo_task
from .checkpoint import ResumeError, load_checkpoint, loss_identity, resolve_resume, save_checkpoint
from .config import TrainConfig
from .data import BatchIterator, describe_data, load_train_eval
from .evaluate import evaluate_pairs, greedy_accuracy, output_margins, reward_accuracy
from .models import build_policy, build_reference, check_model_paths, model_identity, precision_context, sync_reference
from .run_log import MetricsLog, plot_metrics
from .scoring import score_batch
from .tokenizer import load_tokenizer


class Distributed:
    """Rank, world size and device of this process (``torchrun`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``)."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        check_device(device)
        if device == "cuda" and self.world > 1:
            device = f"cuda:{local}"
        self.device = torch.device(device)
        self.owns_group = self.world > 1 and not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def close(self) -> None:
        """Tear down the process group this object created: left to the interpreter's exit, gloo's worker
        threads could abort the process ("terminate called without an active exception")."""
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """``flag`` on any rank (every rank must call it at the same point)."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t)

    def shard(self, items: list) -> list:
        return items[self.rank:: self.world]

    def total(self, value: float) -> float:
        """``value`` summed over the ranks (every rank must call it at the same point)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(t)
        return float(t)

    def mean(self, value: float) -> float:
        return self.total(value) / self.world


def check_device(device: str) -> None:
    """Refuse a CUDA device this torch cannot use, before any model is built."""
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device: {device!r} requested, but {why} (torch {torch.__version__}); "
                         "use --device cpu (or auto)")
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ValueError(f"device: {device!r} requested, but only {torch.cuda.device_count()} CUDA device(s) are visible")


class StopFlag:
    """SIGINT handler for the training loop: the first Ctrl-C asks the loop to stop at the next step
    boundary; a second one raises ``KeyboardInterrupt`` at once (abort, no checkpoint). Installed only
    in the main thread (the only one Python delivers signals to); restores the previous handler on exit."""

    def __init__(self, announce: bool):
        self.requested = False
        self.announce = announce
        self._previous: Any = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print("\ninterrupt: finishing the current step, then saving a checkpoint (Ctrl-C again aborts "
                  "without saving)", file=sys.stderr)

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def lr_lambda(cfg: TrainConfig, total: int):
    warm = cfg.warmup_steps or 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        p = (step - warm) / max(1, total - warm)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - p)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))
        return 1.0

    return factor


def schedule_progress(step: int, total: int) -> float:
    """Progress in [0, 1] of the loss schedules at the optimizer step that starts at ``step`` (0-based) of
    ``total``: ``step / (total - 1)``, so the first step runs at the start value and the last at the end
    value (0 for a one-step run). The LR schedule keeps its own counting (:func:`lr_lambda`)."""
    return step / max(1, total - 1)


def total_steps(cfg: TrainConfig, num_train: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * num_train / (cfg.batch_size * cfg.grad_accum)))


class Trainer:
    """Everything one run holds; :meth:`run` trains, evaluates, saves and returns the summary."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.dist = Distributed(cfg.device)
        torch.manual_seed(cfg.seed)
        self.out = Path(cfg.output_dir)
        check_model_paths(cfg)
        self.tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
        self.train_set, self.eval_set, self.summaries = load_train_eval(cfg, self.tokenizer)
        if self.dist.main:
            print("\n".join(describe_data(self.summaries, {"train": len(self.train_set), "held-out": len(self.eval_set)})))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        # train mode from the start (from_pretrained returns eval mode; evaluate() restores the mode it found)
        self.model = build_policy(cfg, self.tokenizer).to(self.dist.device).train()
        self.reference = build_reference(cfg, self.model)
        if self.reference is not None:
            self.reference.to(self.dist.device)
        if cfg.prefix_sharing:
            try:
                enable_prefix_sharing(self.model)
                if self.reference is not None:
                    enable_prefix_sharing(self.reference)
            except ValueError as exc:  # a model prefix sharing cannot reproduce: say how to train without it
                raise ValueError(f"{exc}; train without it with prefix_sharing: false "
                                 "(--prefix_sharing false)") from exc
        self.sharded = self.dist.world > 1 and cfg.fsdp
        if self.sharded:
            shard_fsdp2(self.model, self.dist.device)
        self.loss_fn = FusedPreferenceLoss(cfg.loss_name(), softcap=lm_head_of(self.model).softcap,
                                           **cfg.fused_loss_options(), **cfg.loss_args_at(0.0))
        self.total = total_steps(cfg, len(self.train_set))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.total))
        if self.dist.world > 1 and cfg.batch_size < self.dist.world:
            raise ValueError(f"batch_size: the global batch ({cfg.batch_size}) must give every one of the "
                             f"{self.dist.world} processes at least one pair")
        # under torchrun every batch is full, so no rank is left without pairs at an epoch's end
        self.batches = BatchIterator(self.train_set, cfg.batch_size, seed=cfg.seed, drop_last=self.dist.world > 1)
        self.identity = {**model_identity(cfg, self.model), **loss_identity(cfg.loss_components(), self.loss_fn, schedule=cfg.loss_schedule)}
        self.ref_cache = None
        self.cache_index: dict[int, int] = {}
        if cfg.reference == "cache" and self.reference is not None:
            self._open_cache()
        self.wrapped: nn.Module = self.model
        if self.dist.world > 1 and not self.sharded:
            ids = None if self.dist.device.type == "cpu" else [self.dist.device]
            self.wrapped = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.step = 0

    # -------------------------------------------------------------------------------- pieces

    def _open_cache(self) -> None:
        from ..ref_cache import open_reference_cache

        every = self.train_set + self.eval_set
        self.cache_index = {id(ex): i for i, ex in enumerate(every)}
        examples = [{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for ex in every]
        path = self.cfg.reference_cache or str(self.out / "reference_cache.safetensors")
        self.out.mkdir(parents=True, exist_ok=True)

        def attempt() -> Optional[BaseException]:
            try:
                self.ref_cache = open_reference_cache(path, self.reference, examples, batch_size=self.cfg.batch_size,
                                                      device=self.dist.device, progress=self.dist.main)
            except Exception as exc:  # re-raised below, once every rank knows
                return exc
            return None

        # under torchrun rank 0 computes (or checks) the file while the others wait, then they load it; each
        # phase ends in a collective that also tells every rank whether one failed, so none is left waiting
        phases = ("rank 0", "another rank") if self.dist.world > 1 else ("this process",)
        for phase in phases:
            mine = self.dist.world == 1 or self.dist.main == (phase == "rank 0")
            error = attempt() if mine else None
            if self.dist.any(error is not None):
                if error is not None:
                    raise error
                raise RuntimeError(f"reference_cache: opening {path!r} failed on {phase} (its error is in that "
                                   "process's output)")
        self.reference = None  # the scores are cached; the copy is no longer needed

    def _score(self, model: nn.Module, examples: list, loss_inputs: Optional[dict[str, Any]] = None):
        ref_logps = None
        if self.ref_cache is not None:
            ref_logps = self.ref_cache.sequence_logps([self.cache_index[id(ex)] for ex in examples])
        with precision_context(self.cfg, self.dist.device):  # policy and reference forwards; backward outside
            return score_batch(self.loss_fn, model, self.reference, examples, prefix_sharing=self.cfg.prefix_sharing,
                               pad_id=self.pad_id, device=self.dist.device, ref_logps=ref_logps,
                               loss_inputs=loss_inputs)

    def _step_loss_inputs(self, micro: list[list]) -> dict[str, Any]:
        """``nll_mean_length`` for a loss with a batch-token-mean NLL term: the mean chosen length over the
        step's pairs on every rank, so that the accumulated micro-batch terms sum to the token mean over the
        whole step (:func:`pygpo.losses.common_inputs.batch_token_mean_nll`)."""
        if not any("nll_mean_length" in spec.input_names for spec in self.loss_fn.specs):
            return {}
        tokens = self.dist.total(float(sum(len(ex["chosen_ids"]) for examples in micro for ex in examples)))
        pairs = self.dist.total(float(sum(len(examples) for examples in micro)))
        return {"nll_mean_length": tokens / pairs}

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics (the caller skips this when there is no held-out set). The model and the loss run
        in eval mode (a stateful loss's statistics see training data only); both modes are restored."""
        cfg = self.cfg
        modes = [(m, m.training) for m in (self.model, self.loss_fn)]
        for m, _ in modes:
            m.eval()
        try:
            # FSDP2: every rank runs the same forwards (its collectives must match), so each evaluates all items
            shard = (lambda items: items) if self.sharded else self.dist.shard
            held = shard(self.eval_set)  # every held-out pair
            metrics = evaluate_pairs(lambda b: self._score(self.model, b), held, cfg.batch_size)
            metrics = {k: self.dist.mean(v) for k, v in metrics.items()}
            if cfg.is_demo and cfg.generate_eval_size:
                items = shard(self.eval_set[: cfg.generate_eval_size])
                prompts = [self.tokenizer.decode(ex["prompt_ids"], skip_special_tokens=True) for ex in items]
                with precision_context(cfg, self.dist.device):
                    acc = greedy_accuracy(self.model, self.tokenizer, prompts, [ex["prompt_ids"] for ex in items],
                                          demo_task.score, max_new_tokens=cfg.max_new_tokens, device=self.dist.device)
                metrics["eval/greedy_accuracy"] = self.dist.mean(acc)
        finally:
            for m, mode in modes:
                m.train(mode)
        return metrics

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        if cfg.loss_schedule:  # the scheduled values reach the loss, a stateful head's module included
            now = cfg.loss_args_at(schedule_progress(self.step, self.total))
            self.loss_fn.set_hparams(**{name: now[name] for name in cfg.loss_schedule})
        micro = [self.dist.shard(self.batches.next_batch()) for _ in range(cfg.grad_accum)]
        pairs = sum(len(m) for m in micro)
        step_inputs = self._step_loss_inputs(micro)
        sums: dict[str, float] = {}
        tokens = 0
        margins, ties = [], []
        try:
            for i, examples in enumerate(micro):
                self.loss_fn.train(i == 0)  # stateful statistics: one update per optimizer step
                share = len(examples) / pairs
                sync = i == len(micro) - 1 or self.dist.world == 1
                ctx = self.wrapped.no_sync() if not sync and not self.sharded else contextlib.nullcontext()
                with ctx:
                    out = self._score(self.wrapped, examples, step_inputs)
                    (out.loss * share).backward()
                tokens += int(out.lengths.sum())
                for k, v in {"loss": out.loss, **out.metrics}.items():
                    if getattr(v, "numel", lambda: 1)() == 1:
                        sums[k] = sums.get(k, 0.0) + float(v.detach() if hasattr(v, "detach") else v) * share
                m, tie = output_margins(out)
                margins.append(m)
                ties.append(tie)
        finally:
            self.loss_fn.train()
        # eval/reward_accuracy's definition (ties, within float32 rounding, count one half), not the head's
        sums["rewards/accuracies"] = reward_accuracy(torch.cat(margins), torch.cat(ties))
        if cfg.max_grad_norm:
            sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if cfg.sync_ref_every and self.reference is not None and self.step % cfg.sync_ref_every == 0:
            sync_reference(self.reference, self.model, cfg.sync_ref_alpha)
        metrics = {k: self.dist.mean(v) for k, v in sums.items()}
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["tokens"] = tokens * self.dist.world
        return metrics

    def save(self, tag: str = "") -> Optional[Path]:
        self.tag = tag
        if self.sharded:
            return save_sharded_checkpoint(self, self.reference if self.cfg.sync_ref_every else None)
        if not self.dist.main:
            return None
        moved_ref = self.reference if self.cfg.sync_ref_every else None
        return save_checkpoint(self.out, step=self.step, model=self.model, reference=moved_ref, optimizer=self.optimizer,
                               scheduler=self.scheduler, loss_fn=self.loss_fn, data_state=self.batches.state_dict(),
                               identity=self.identity, extra={"tag": tag})

    def resume(self, resume: str) -> None:
        path = resolve_resume(resume, self.out)
        if self.sharded:
            self._restore_position(path, load_sharded_checkpoint(self, path))
            return
        state = load_checkpoint(path, model=self.model, reference=self.reference, optimizer=self.optimizer,
                                scheduler=self.scheduler, loss_fn=self.loss_fn, identity=self.identity)
        self._restore_position(path, state)

    def _restore_position(self, path: Path, state: dict[str, Any]) -> None:
        try:
            self.batches.load_state_dict(state["data"])
        except ValueError as exc:
            raise ResumeError(f"resume: {str(path)!r} does not fit this run's data ({exc})") from None
        self.step = int(state["step"])

    # -------------------------------------------------------------------------------- the run

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        resumed = self.step if cfg.resume is None else None
        if cfg.resume is not None:
            self.resume(cfg.resume)
            resumed = self.step
        if self.dist.main:  # only now: a refused resume leaves the run directory's config.yaml as it was
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(cfg.to_yaml())
        log = MetricsLog(self.out / "metrics.jsonl", resume_step=None if cfg.resume is None else resumed) if self.dist.main else None
        first = None
        if self.step == 0 and self.eval_set:
            first = self.evaluate()
            if log:
                log.write(0, first)
        elif log:  # resumed: the initial evaluation is the step-0 record of metrics.jsonl, if it is there
            first = log.evaluation_at(0)
        bar = _progress(self.total, self.step, self.dist.main)
        self.started, self.tokens_seen = time.perf_counter(), 0
        # The handler stays installed to the end: a Ctrl-C during the last checkpoint or the final
        # evaluation is deferred like one during a step (a second one still aborts at once).
        with StopFlag(announce=self.dist.main) as stop:
            try:
                while self.step < self.total:
                    self._one_step(log, bar)
                    # a whole step is done: weights, optimizer, data position and step counter agree
                    if self.dist.any(stop.requested) and self.step < self.total:
                        break
            finally:
                if bar is not None:
                    bar.close()
            if stop.requested and self.step < self.total:
                path = self.save("interrupted")
                if self.dist.main:
                    print(f"interrupted at step {self.step}: checkpoint saved to {path}; resume with --resume {path}",
                          file=sys.stderr)
                return {"interrupted": True, "step": self.step, "checkpoint": str(path)}
            # the trained weights reach the disk before the final evaluation, which may be long
            path = self.save("final")
            final = self.evaluate() if self.eval_set else {}
        summary: dict[str, Any] = {"step": self.step, "checkpoint": str(path), "final": final}
        if first is not None:
            summary["initial"] = first
        if not self.eval_set:
            summary["evaluation"] = NO_EVAL
        summary["data"] = {k: s.as_dict() for k, s in self.summaries.items()}
        if log:
            if final:
                log.write(self.step, final)
            plot_metrics(log.records(), self.out)
            import json

            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
            _print_summary(summary)
        return summary

    def _one_step(self, log: Optional[MetricsLog], bar: Any) -> None:
        """One optimizer step and what follows it: log line, progress bar, evaluation, checkpoint."""
        cfg = self.cfg
        metrics = self.train_step()
        self.tokens_seen += metrics["tokens"]
        metrics["tokens_per_s"] = self.tokens_seen / max(time.perf_counter() - self.started, 1e-9)
        if log and (self.step % cfg.log_every == 0 or self.step == self.total):
            log.write(self.step, metrics)
            _write_line(bar, format_metrics(self.step, self.total, metrics))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics.get('rewards/accuracies', float('nan')):.2f}",
                            tok_s=f"{metrics['tokens_per_s']:.0f}")
        if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total and self.eval_set:
            ev = self.evaluate()
            if log:
                log.write(self.step, ev)
        if cfg.save_every and self.step % cfg.save_every == 0:
            self.save()


NO_EVAL = "no held-out set (eval_fraction 0 and no eval_dataset): evaluation skipped"

#: the metrics of the periodic log line, in order, with their format
LOG_LINE = (("loss", ".4f"), ("rewards/accuracies", ".3f"), ("rewards/margins", ".4f"), ("grad_norm", ".3f"),
            ("lr", ".3g"), ("tokens_per_s", ".0f"))


def format_metrics(step: int, total: int, metrics: dict[str, Any]) -> str:
    """The one-line summary printed every ``log_every`` steps: ``step 10/200: loss 0.6931 ...``."""
    parts = [f"{key} {float(metrics[key]):{fmt}}" for key, fmt in LOG_LINE if key in metrics]
    return f"step {step}/{total}: " + " ".join(parts)


def _write_line(bar: Any, line: str) -> None:
    """Print above the progress bar (or plainly without one)."""
    if bar is None:
        print(line)
    else:
        bar.write(line)


def shard_fsdp2(model: nn.Module, device: torch.device) -> None:
    """FSDP2 (``fully_shard``) on every decoder layer, then on the whole model (embeddings, norm, lm_head)."""
    from ..versions import fsdp2_on_cpu_problem

    problem = fsdp2_on_cpu_problem() if device.type == "cpu" else None
    if problem:
        raise ValueError(f"fsdp: {problem}; train on GPUs, without --fsdp (DDP), or with a newer torch")
    from torch.distributed.device_mesh import init_device_mesh
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.5: FSDP2 before its public path
        from torch.distributed._composable.fsdp import fully_shard

    from ..integrations.hidden_states import decoder_body

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in decoder_body(model).layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def save_sharded_checkpoint(trainer: "Trainer", moved_ref: Optional[nn.Module]) -> Optional[Path]:
    """Gather the full model and optimizer state (every rank takes part), then rank 0 writes the checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(trainer.model, options=full)
    optim_state = get_optimizer_state_dict(trainer.model, trainer.optimizer, options=full)
    if not trainer.dist.main:
        return None
    return save_checkpoint(trainer.out, step=trainer.step, model=trainer.model, reference=moved_ref,
                           optimizer=_StateOnly(optim_state), scheduler=trainer.scheduler, loss_fn=trainer.loss_fn,
                           data_state=trainer.batches.state_dict(), identity=trainer.identity,
                           extra={"tag": getattr(trainer, "tag", "")}, model_state=model_state)


def load_sharded_checkpoint(trainer: "Trainer", path: Path) -> dict[str, Any]:
    """Every rank reads the full checkpoint and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    holder = _StateOnly({})
    state = load_checkpoint(path, model=None, reference=trainer.reference, optimizer=holder, scheduler=trainer.scheduler,
                            loss_fn=trainer.loss_fn, identity=trainer.identity)
    from safetensors.torch import load_file

    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(trainer.model, load_file(str(path / "model.safetensors")), options=full)
    set_optimizer_state_dict(trainer.model, trainer.optimizer, holder.state, options=full)
    return state


class _StateOnly:
    """An optimizer stand-in holding an already gathered state dict (for save) or receiving one (for load)."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (CI logs, `> file`), where each redraw would be a line
    return tqdm(total=total, initial=start, desc="pygpo train", unit="step", dynamic_ncols=True, disable=None)


def _print_summary(summary: dict[str, Any]) -> None:
    first, final = summary.get("initial"), summary["final"]
    lines = [f"finished {summary['step']} steps; checkpoint: {summary['checkpoint']}"]
    for key in ("eval/reward_accuracy", "eval/greedy_accuracy", "eval/loss"):
        if key in final:
            before = f"{first[key]:.3f} -> " if first and key in first else ""
            lines.append(f"  {key}: {before}{final[key]:.3f}")
    if "evaluation" in summary:
        lines.append(f"  {summary['evaluation']}")
    lines += [f"  {line}" for line in describe_data(summary.get("data", {}))]
    print("\n".join(lines))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training as configured; returns the summary (also written to ``summary.json``)."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.dist.close()

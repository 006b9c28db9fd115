"""Where metrics go: `OUTPUT_DIR/metrics.jsonl` (appended across resumes) and wandb, both from global rank 0.

wandb's mode is `WANDB_MODE` when set, else `tracking.wandb.mode` (online | offline | disabled); an online run that
cannot start (no login, no network) falls back to offline with one line saying so, instead of killing the job.
The run's config holds the recipe, the DeepSpeed JSON, the layout, the data summary, the FLOP count below and the
memory estimate (`moe_model.estimate`) where it can be computed.

Every metrics.jsonl line goes to wandb at the same step under the same key; a per-layer list `k` becomes the
scalars `k/0, k/1, ...`, and the layers x experts matrix `expert_tokens` stays in metrics.jsonl (`moe report`
draws it).

Throughput (`throughput_metrics`): model FLOPs per token of one training step, PaLM's count (appendix B) with the
attention halved for the causal mask, as the performance model (`moe_model/estimate/perf.py`) counts it, so that
predicted and achieved MFU compare:
    6 x (active parameters per token - the input embedding, a lookup)       weight matmuls, forward + backward
  + 6 x layers x seq_len x heads x head_dim                                 attention scores and values (QK^T, AV):
                                                                            3 x forward of 4*S*Hq*d, halved (causal)
Recomputation under activation checkpointing is not counted (model FLOPs, not hardware FLOPs). Achieved TFLOPs
per GPU = FLOPs per token x tokens/s / world size; MFU = that / `hardware.peak_tflops`. On CPU ranks the MFU is
against the recipe's GPU figure, so it is tiny there by design.

Memory, each figure the largest over ranks, keyed on the engine's device (`engine.device.type`), not on
`torch.cuda.is_available()` (a CPU run on a machine with a GPU measures the host):
  memory_peak_gb            `torch.cuda.max_memory_allocated` on CUDA ranks; the process's peak resident set size
                            (`ru_maxrss`) on CPU ranks. Every run logs it, with the same meaning as before.
  memory_reserved_peak_gb   CUDA only: `torch.cuda.max_memory_reserved`, the caching allocator's high-water mark;
                            memory_reserved_peak_gb / memory_peak_gb - 1 measures the estimate's `fragmentation`
                            (5% assumed, `moe_model/estimate/memory.py`).
  device_memory_used_gb     CUDA only: the card's used memory when the line is logged, total - free from
                            `torch.cuda.mem_get_info` (cudaMemGetInfo): the allocator's segments plus the CUDA
                            context, cuBLAS workspaces and NCCL buffers outside it, and anything other processes hold
                            on the card; device_memory_used_gb - memory_reserved_peak_gb bounds the estimate's
                            `reserve_bytes` (1.5 GB assumed) from below (the allocator may hold less than its peak).
On CPU ranks the two CUDA keys are absent from the line, not null: the host has no allocator cache or card to read,
and a key that is there was measured (wandb drops nulls anyway). `memory_metric` in the run config names the source of
memory_peak_gb.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from ..configuration import MoEConfig
from ..metrics_file import read_metrics as read_metrics_file
from ..recipe import Recipe
from .device import Device
from .distributed import collective_device


def flops_per_token(config: MoEConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token (see the module docstring): {'matmul', 'attention', 'total'}."""
    from ..estimate.params import count_params

    counts = count_params(config)
    embedding_lookup = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    matmul = 6.0 * (counts.active_per_token - embedding_lookup)
    attention = 6.0 * config.num_hidden_layers * seq_len * config.num_attention_heads * config.head_dim
    return {"matmul": matmul, "attention": attention, "total": matmul + attention}


def throughput_metrics(tokens_per_s: float, per_token_flops: float, world_size: int,
                       peak_tflops: float) -> dict[str, float]:
    tflops = per_token_flops * tokens_per_s / world_size / 1e12
    return {"tflops_per_gpu": tflops, "mfu": tflops / peak_tflops}


def memory_metric_name(device: torch.device) -> str:
    """Where `memory_peak_gb` comes from on `device` (the engine's)."""
    return "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS (ru_maxrss)"


def process_memory_bytes(device: torch.device) -> dict[str, int]:
    """This rank's memory figures in bytes, under the metrics' names (see the module docstring): on CUDA the
    allocator's peaks and the card's used memory, elsewhere the process's peak resident set size."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {"memory_peak_gb": int(torch.cuda.max_memory_allocated(device)),
                "memory_reserved_peak_gb": int(torch.cuda.max_memory_reserved(device)),
                "device_memory_used_gb": int(total - free)}
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"memory_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}


def memory_metrics(device: torch.device) -> dict[str, float]:
    """The largest rank's memory figures in GB (1e9 bytes), keyed as in metrics.jsonl (a collective: every rank must
    call it at the same step; every rank's engine sits on the same kind of device, so all send the same keys)."""
    import torch.distributed as dist

    figures = process_memory_bytes(device)
    peaks = torch.tensor([float(v) for v in figures.values()], dtype=torch.float64)
    if dist.is_initialized():
        peaks = peaks.to(collective_device())
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    return {key: value / 1e9 for key, value in zip(figures, peaks.tolist())}


def run_config_extras(recipe: Recipe, world_size: int, engine_device: torch.device, device: Device) -> dict[str, Any]:
    """What the run config adds to recipe, DeepSpeed JSON and layout: FLOP count, memory metric, the device
    (`device.Device`: name, card memory, known peak) and the estimate against the launch's budget (the card's memory
    where it is below the recipe's figure, `estimate.guard.card_budget`)."""
    extras: dict[str, Any] = {"flops_per_token": flops_per_token(recipe.moe_config(), recipe.train.seq_len),
                              "memory_metric": memory_metric_name(engine_device), "device": device.as_json()}
    try:
        from ..estimate import estimate
        from ..estimate.guard import card_budget

        judged, _ = card_budget(recipe, device.memory_bytes, device.name)
        extras["estimate"] = estimate(judged, world_size).as_json()
    except Exception as err:  # the estimator is optional here: never stop a run because it cannot answer
        extras["estimate"] = {"unavailable": f"{type(err).__name__}: {err}"}
    return extras


def wandb_scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.jsonl's line as wandb scalars: lists of numbers become `key/i`, matrices stay out."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, list):
            if all(isinstance(v, (int, float)) for v in value):
                flat.update({f"{key}/{i}": v for i, v in enumerate(value)})
        elif value is not None:
            flat[key] = value
    return flat


class Tracker:
    """metrics.jsonl and the wandb run, on the rank where `enabled`.

    The wandb run's id is kept in `OUTPUT_DIR/wandb_run_id`: a resumed run (`resume=True`) continues that wandb run
    (`wandb.init(id=..., resume="allow")`; offline, `wandb sync` uploads both parts into the one run) instead of
    starting another. wandb's own console lines stay off unless MOE_VERBOSE=1 (`console.verbose`).
    """

    ID_FILE = "wandb_run_id"

    def __init__(self, recipe: Recipe, run_config: dict[str, Any], enabled: bool, resume: bool = False):
        self.enabled = enabled
        self.path = recipe.output_dir / "metrics.jsonl"
        self.run = None
        self.mode = "disabled"
        if not enabled:
            return
        self.mode = os.environ.get("WANDB_MODE") or recipe.tracking.wandb.mode
        if self.mode != "disabled":
            self.run = self._start_wandb(recipe, run_config, resume)

    def _start_wandb(self, recipe: Recipe, run_config: dict[str, Any], resume: bool):
        import wandb

        from .console import verbose

        w = recipe.tracking.wandb
        id_file = recipe.output_dir / self.ID_FILE
        kwargs = {"project": w.project, "entity": w.entity, "group": w.group, "name": recipe.name,
                  "dir": str(recipe.output_dir), "config": run_config, "settings": wandb.Settings(silent=not verbose())}
        if resume and id_file.is_file():
            kwargs.update(id=id_file.read_text().strip(), resume="allow")
        try:
            run = wandb.init(mode=self.mode, **kwargs)
        except Exception as err:
            if self.mode == "offline":
                raise
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f"moe: wandb {self.mode} run could not start ({reason}); logging offline under "
                  f"{recipe.output_dir / 'wandb'} (upload later with `wandb sync`)", file=sys.stderr)
            self.mode = "offline"
            run = wandb.init(mode="offline", **kwargs)
        id_file.write_text(run.id + "\n")
        return run

    def where(self) -> str | None:
        """Where the wandb run goes, for the console header (None: no wandb run)."""
        if self.run is None:
            return None
        if self.mode == "offline":
            return f"offline run {self.run.id} in {Path(self.run.dir).parent} (upload with `wandb sync`)"
        return f"{self.run.url or self.run.id}"

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.run is not None:
            self.run.log(wandb_scalars(metrics), step=metrics["step"])

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    return read_metrics_file(Path(output_dir) / "metrics.jsonl")  # the one reader: moe_model.metrics_file

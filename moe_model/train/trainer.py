"""One training run on every rank, once the process group exists: set-up, steps, evaluations, finish.

    Trainer(recipe, rank, world).run()  ->  0, or raises RunStopped(code, line)

A run that cannot go on raises `RunStopped` wherever it finds out (a bad corpus, a bad resume point, a non-finite
loss); `main.main` is the one place that turns it into "print the line on global rank 0, return the code". Every
rank reaches the same verdict at the same point (the checks are collectives or the same arithmetic everywhere), so
no rank is left waiting. Exit codes: 2 bad input (one line, nothing trained), 1 the estimate does not fit, 3 the loss
went non-finite (the line names the newest good checkpoint), 74 a checkpoint could not be written (a full disk, a
file-size limit: `checkpoint.SaveFailed`), 75 stopped on request (SIGTERM/SIGUSR1, `preemption`: after the step,
with a checkpoint); an interrupted run (SIGINT) is `main.main`'s: one line, 130.

Validation: every `train.eval_every` steps and at the last step (`evaluation.Validation`), and, when
`train.eval_at_start` is set, once before the first optimizer step of a fresh run, logged as a metrics line of step 0
that holds the validation keys only, so the validation curve starts where training starts.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from ..losses import StepStats
from ..parallel import Layout
from ..parallel.state_dict_adapter import score_biases
from ..recipe import Recipe, RecipeError
from ..routing import bias_update
from ..strategy import Strategy
from . import checkpoint, preemption, reshard
from .console import header, library_output, print_summary
from .distributed import collective_device


class RunStopped(Exception):
    """The run ends early with exit `code`; `line` (one line) is shown once, on global rank 0."""

    def __init__(self, code: int, line: str):
        super().__init__(line)
        self.code, self.line = code, line


def recipe_error(err: RecipeError | str, suffix: str = "") -> RunStopped:
    return RunStopped(2, f"moe: recipe error: {err}{suffix}")


def checkpoint_due(train, step: int) -> bool:
    """Whether a checkpoint is written after `step` (1-based) of a run whose `train` section this is: every
    `save_every` steps, at `stop_at`, and at the last step (`save_last`, default on: a finished run always leaves
    what `moe export` reads)."""
    periodic = train.save_every and step % train.save_every == 0
    return bool(periodic or step == train.stop_at or (step == train.steps and train.save_last))


class Trainer:
    def __init__(self, recipe: Recipe, rank: int, world: int):
        self.recipe, self.rank, self.world = recipe, rank, world
        self.checkpoints = recipe.output_dir / "checkpoints"
        self.history: list[dict[str, Any]] = []
        self.progress = None
        self.current_step: int | None = None  # the 0-based step running now (for an interrupted run's line)
        # the recipe's model section as JSON holds it: what a checkpoint's manifest records and a resume compares
        self.model_fields = recipe.model.model_dump(mode="json")

    def run(self) -> int:
        # DeepSpeed 0.19's collectives call torch's all_gather_into_tensor, which torch 2.13 marks deprecated: noise,
        # silenced for this run only
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)
            self.set_up()
            started = time.perf_counter()
            try:
                if self.first_step == 0 and self.recipe.train.eval_at_start and self.validation.every:
                    self.log({"step": 0, **self.validation.run()})
                for step in range(self.first_step, self.last_step):
                    self.current_step = step
                    self.step(step)
            finally:
                if self.progress is not None:
                    self.progress.close()
            if self.last_step < self.recipe.train.steps:  # train.stop_at: after the progress bar's last line
                self.say(f"moe: stopped after step {self.last_step} (train.stop_at), checkpoint saved; launch again "
                         f"with resume: auto to go on to step {self.recipe.train.steps}")
            self.finish(time.perf_counter() - started)
        return 0

    def say(self, line: str) -> None:
        if self.rank == 0:
            print(line, file=sys.stderr)

    def set_up(self) -> None:
        """Estimate, data, resume point, engine, tracker, batches: everything a step needs."""
        recipe, p = self.recipe, self.recipe.parallel
        from ..estimate import launch_refusal
        from .device import this_device
        from .host_memory import cpu_host_refusal

        self.device = this_device()  # on CUDA a collective: the smallest card of any rank, the same on every rank
        refusal = launch_refusal(recipe, self.world, card_bytes=self.device.memory_bytes, card_name=self.device.name)
        refusal = refusal or cpu_host_refusal(recipe, self.world)  # CPU ranks: the host's memory (a collective)
        if refusal:
            raise RunStopped(1, refusal)
        self.layout = layout = Layout.of(Strategy.from_recipe(recipe, self.world)[0])
        self.layout_sizes = {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep, "dp": layout.dp,
                             "moe_backend": layout.moe_backend}
        resume_from, notes, changes = self.resume_point()  # a refusal comes before any other line
        if layout.dp == 1 and p.zero_stage > 0:
            self.say(f"moe: note: ZeRO-{p.zero_stage} partitions over data-parallel ranks and this run has one; it "
                     "only adds gradient and weight copies here (a 1-rank step measured 2.3x slower than at ZeRO-0): "
                     "--set parallel.zero_stage=0")
        from .data import StepBatches, prepare_data

        # the tokenizer and token cache are built once (local rank 0) before any engine exists; a bad corpus stops all
        data_problem, data_summary = prepare_data(recipe)
        if data_problem:
            raise recipe_error(data_problem)
        from .engine import build_engine

        try:
            with library_output():  # another layout's checkpoint: this rank's share built from its pieces
                self.engine, self.run_step, ds_config = build_engine(recipe, layout, resuming=resume_from is not None,
                                                                     pieces=resume_from if changes else None)
        except RecipeError as err:  # train.init_from's folder cannot fill the model: the same on every rank
            raise recipe_error(err) from None
        self.first_step = 0
        self.last_step = min(recipe.train.steps, recipe.train.stop_at or recipe.train.steps)
        for note in notes:
            self.say(f"moe: {note}")
        if resume_from is not None and changes:
            self.first_step = reshard.load(self.engine, resume_from, layout, recipe.moe_config())
            self.say(f"moe: resuming from {resume_from} (step {self.first_step}) on another layout "
                     f"({', '.join(changes)}): weights, both Adam moments, step counts and data position carried over")
        elif resume_from is not None:
            self.first_step = checkpoint.load(self.engine, resume_from)
            self.say(f"moe: resuming from {resume_from} (step {self.first_step})")
            if self.rank == 0:
                checkpoint.trim_metrics(recipe.output_dir / "metrics.jsonl", self.first_step)
        self.bias_rate = recipe.model.router_bias_update_rate
        self.score_biases = score_biases(self.engine.module, layout.pp > 1, recipe.moe_config()) if self.bias_rate else {}
        self.portable = recipe.train.portable_checkpoints and reshard.serves(self.engine)
        if recipe.train.portable_checkpoints and not self.portable:
            self.say(f"moe: note: {recipe.train.precision} without ZeRO (DeepSpeed's FP16_UnfusedOptimizer at pp 1) "
                     "keeps its fp32 master weights where DeepSpeed's accessors cannot read them: this run's "
                     "checkpoints resume its own layout only (--set parallel.zero_stage=1 makes them portable)")
        self.start_tracking(ds_config, data_summary)
        self.batches = StepBatches(recipe, layout.dp, layout.coords(self.rank)["data"])
        from .evaluation import Validation

        self.validation = Validation(recipe, self.engine, layout, self.rank)
        if self.rank == 0:
            from tqdm import tqdm

            self.progress = tqdm(total=recipe.train.steps, initial=self.first_step, desc=recipe.name, unit="step",
                                 dynamic_ncols=True)

    def resume_point(self) -> tuple[Path | None, list[str], list[str]]:
        """(checkpoint to resume from or None, notes to show, how its layout differs from this run's: resumed from
        its portable states where any), decided on global rank 0 alone (it reads and hashes the checkpoint files
        once, `checkpoint.find_resume`; a layout change also needs pieces that cover every parameter,
        `reshard.problem`) and sent to every rank. A resume also needs a readable
        metrics.jsonl (its trim, `checkpoint.trim_metrics`). `resume: auto` with no checkpoint in a directory that
        holds an earlier run's metrics moves them into `archive-<time>/` (`ownership`) instead of appending."""
        import torch.distributed as dist

        from ..errors import UserError
        from ..metrics_file import read_metrics_lines
        from .ownership import archive_previous_run, previous_run

        answer: list[Any] = [None, [], None, []]  # path, notes, refusal line, layout changes
        if self.rank == 0:
            recipe = self.recipe
            try:
                chosen, notes = checkpoint.find_resume(self.checkpoints, recipe.train.resume, self.layout_sizes,
                                                       self.model_fields, recipe.parallel.zero_stage)
                changes = [] if chosen is None else checkpoint.layout_changes(
                    checkpoint.read_manifest(chosen), self.layout_sizes, recipe.parallel.zero_stage)
                if changes:
                    missing = reshard.problem(chosen, recipe.moe_config())
                    if missing:
                        raise RecipeError("train.resume", f"{chosen} cannot resume another layout: {missing}")
                metrics = recipe.output_dir / "metrics.jsonl"
                if chosen is not None and metrics.exists():
                    read_metrics_lines(metrics)  # a bad line that is not a torn last one: refused, named
                if chosen is None and recipe.train.resume == "auto" and previous_run(recipe.output_dir):
                    archived = archive_previous_run(recipe.output_dir)
                    notes.append(f"no checkpoint to resume from: moved the earlier run's files into {archived}")
                answer = [None if chosen is None else str(chosen), notes, None, changes]
            except RecipeError as err:
                answer[2] = recipe_error(err).line
            except UserError as err:
                answer[2] = f"moe: error: {err}"
        dist.broadcast_object_list(answer, src=0)
        path, notes, refusal, changes = answer
        if refusal:
            raise RunStopped(2, refusal)
        return (None if path is None else Path(path)), notes, changes

    def start_tracking(self, ds_config: dict[str, Any], data_summary: dict[str, Any]) -> None:
        """run.json, the tracker (resuming the run's wandb run), the FLOP count, and the console header."""
        from .device import peak_tflops_warning
        from .tracking import Tracker, flops_per_token, run_config_extras

        recipe = self.recipe
        self.run_config = {"recipe": recipe.model_dump(), "deepspeed": ds_config,
                           "layout": {**self.layout_sizes, "world_size": self.world}}
        self.run_config.update(data=data_summary, **run_config_extras(recipe, self.world, self.engine.device,
                                                                             self.device))
        if self.rank == 0:
            import json

            (recipe.output_dir / "run.json").write_text(json.dumps(self.run_config, indent=2))
        self.tracker = Tracker(recipe, self.run_config, enabled=self.rank == 0, resume=self.first_step > 0)
        self.tokens_per_step = recipe.train.global_batch_size * recipe.train.seq_len
        self.step_flops = flops_per_token(recipe.moe_config(), recipe.train.seq_len)["total"]
        self.say(header(recipe, self.run_config, self.tracker.where(), peak_tflops_warning(recipe, self.device)))

    def step(self, step: int) -> None:
        """Optimizer step `step` (0-based; logged as step + 1), its evaluation when due, its checkpoint when due."""
        from .tracking import throughput_metrics

        recipe, engine = self.recipe, self.engine
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]
        stats = self._reduce(self.run_step(self.batches.micro_batches(step)))
        if self.score_biases:  # aux-loss-free balancing, from the step's loads summed over every rank (all equal)
            delta_LE = bias_update(stats.expert_counts_LE, self.bias_rate)
            for row, bias in self.score_biases.items():
                bias.add_(delta_LE[row].to(bias.device))
        step_time = time.perf_counter() - t0
        metrics = step_metrics(step + 1, stats, lr, engine.get_global_grad_norm(), step_time, self.tokens_per_step)
        metrics.update(throughput_metrics(metrics["tokens_per_s"], self.step_flops, self.world,
                                          recipe.hardware.peak_tflops))
        evaluate = self.validation.due(step + 1)
        if evaluate:
            metrics.update(self.validation.run())
        if (step + 1) % recipe.train.log_every == 0 or step + 1 == self.last_step or evaluate:
            self.log(metrics)
        else:
            self.history.append(metrics)
        self.show(metrics)
        if is_fault(metrics["loss"], engine):
            newest = checkpoint.newest(self.checkpoints)
            raise RunStopped(3, f"moe: the loss is {metrics['loss']} at step {step + 1}; stopping. Newest good "
                                f"checkpoint: {newest or 'none'} (lower train.lr or check the data, then resume)")
        saved = checkpoint_due(recipe.train, step + 1)
        if saved:
            self.save(step + 1)
        if step + 1 < self.last_step and preemption.agreed(collective_device()):
            started = time.perf_counter()
            directory = self.checkpoints / checkpoint.tag_for(step + 1)
            took = "the step's scheduled one"
            if not saved:
                directory = self.save(step + 1)
                took = f"written in {time.perf_counter() - started:.1f} s"
            asked = preemption.requested() or "a signal to another rank"
            raise RunStopped(preemption.PREEMPTED, (
                f"moe: stopped on request ({asked}) after step {step + 1} of {recipe.train.steps}; checkpoint "
                f"{directory} ({took})"))

    def save(self, step: int):
        """The checkpoint of `step` on every rank; a write that fails on any rank stops all (`checkpoint.SaveFailed`:
        exit 74, its line)."""
        recipe = self.recipe
        try:
            return checkpoint.save(self.engine, self.checkpoints, step, self.layout_sizes,
                                   recipe.train.keep_checkpoints, model=self.model_fields,
                                   zero_stage=recipe.parallel.zero_stage,
                                   portable_config=recipe.moe_config() if self.portable else None)
        except checkpoint.SaveFailed as err:
            raise RunStopped(checkpoint.SAVE_FAILED, str(err)) from None

    def _reduce(self, stats: StepStats) -> StepStats:
        """This rank's step figures -> the step's averages over every rank and micro-batch (a collective)."""
        return stats.all_reduce(collective_device()).mean(self.batches.accumulation, self.layout.dp, self.layout.tp)

    def log(self, metrics: dict[str, Any]) -> None:
        """One metrics line (metrics.jsonl and wandb, from rank 0); every rank calls it at the same steps."""
        from .tracking import memory_metrics

        metrics.update(memory_metrics(self.engine.device))  # a collective
        self.history.append(metrics)
        self.tracker.log(metrics)

    def show(self, metrics: dict[str, Any]) -> None:
        if self.progress is None:
            return
        self.progress.update(1)
        shown = {"loss": f"{metrics['loss']:.4f}", "tok_s": f"{metrics['tokens_per_s']:.0f}"}
        if "val_loss" in metrics:
            shown["val"] = f"{metrics['val_loss']:.4f}"
        self.progress.set_postfix(shown)

    def finish(self, wall_s: float) -> None:
        import torch.distributed as dist

        if self.rank == 0 and any("loss" in m for m in self.history):
            print_summary(self.recipe, self.history, wall_s, self.run_config["layout"])
        self.tracker.finish()
        dist.barrier()


def is_fault(loss: float, engine) -> bool:
    """A non-finite loss stops the run, except where fp16's dynamic loss scaling skipped that step by itself."""
    if math.isfinite(loss):
        return False
    fp16_skipped = bool(engine.fp16_enabled()) and not engine.was_step_applied()
    return not fp16_skipped


def step_metrics(step, stats, lr, grad_norm, step_time, tokens_per_step) -> dict[str, Any]:
    """One line of metrics.jsonl. Expert load: routes each expert got in this step, over all ranks and micro-batches.

    `stats` is the step's `StepStats` after `all_reduce(...).mean(...)`: losses averaged over its micro-batches.
    """
    load_LE = stats.expert_counts_LE
    max_over_mean_L = load_LE.max(dim=1).values / load_LE.mean(dim=1)
    return {
        "step": step,
        "loss": stats.loss.item(),
        "lm_loss": stats.lm_loss.item(),
        "aux_loss": stats.aux_loss.item(),
        "z_loss": stats.z_loss.item(),
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "tokens_per_s": tokens_per_step / step_time,
        "step_time_s": step_time,
        "expert_load_max_over_mean": max_over_mean_L.max().item(),
        "expert_load_max_over_mean_per_layer": [round(v, 4) for v in max_over_mean_L.tolist()],
        "experts_without_tokens": int((load_LE == 0).sum().item()),
        "expert_tokens_max_per_layer": [round(v) for v in load_LE.max(dim=1).values.tolist()],
        "expert_tokens_mean_per_layer": [round(v, 2) for v in load_LE.mean(dim=1).tolist()],
        "experts_without_tokens_per_layer": [int(v) for v in (load_LE == 0).sum(dim=1).tolist()],
        "expert_tokens": [[round(v) for v in row] for row in load_LE.tolist()],  # layers x experts (routes)
    }

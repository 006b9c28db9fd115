"""The rank program of `make gpu-check`'s training rows: `moe_model.train.main` (the trainer every run uses), with
what the check reads from the live engine and, in the CPU dry run's tests only, the faults it must catch.

    deepspeed --num_gpus N scripts/gpu_check_rank.py --recipe R [--set k=v ...]

Environment (set by scripts/gpu_check.py):
- GPU_CHECK_PROBE=PATH: global rank 0 writes PATH (JSON) once the engine is built: the number of
  `AutoEPMoELayer` modules in `engine.module` (counted in the module tree `deepspeed.initialize` returned, not read
  from the config: AutoEP whose pattern matches nothing only warns) and the engine's module class; and, after the
  last step of a pp = 1 run, PATH + ".logits.pt": the engine module's logits (fp32, on CPU) on `probe_ids` in eval
  mode, which the check compares with `moe export`'s folder loaded by transformers.
- GPU_CHECK_KILL_AT=K: a fresh launch (not a resume) SIGKILLs every rank as optimizer step K (1-based) begins: no
  handler, no atexit, a checkpoint and a metrics line of step K - 1 possibly already written (the resume trims it).
- GPU_CHECK_FAULTS=a,b (tests only; scripts/gpu_check.py passes it in --cpu-dry-run alone): `backend` scales the
  first AutoEP layer's expert weights by 1.01 at the start of a fresh autoep run; `resume` adds noise to the
  embedding after a resume has loaded its checkpoint.

Why a wrapper and not hooks in the trainer: these are a check's probes and fault injections, not the trainer's
behaviour; they patch `Trainer.set_up` / `step` / `finish` in this process only.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def probe_ids(vocab_size: int, device) -> "torch.Tensor":  # noqa: F821
    """The batch both sides of the export check run: 2 sequences of 32 tokens, seed 7 (the same on every rank)."""
    import torch

    return torch.randint(0, vocab_size, (2, 32), generator=torch.Generator().manual_seed(7)).to(device)


def autoep_layers(module) -> int:
    """How many of DeepSpeed's AutoEP layers the live module tree holds."""
    return sum(type(m).__name__ == "AutoEPMoELayer" for m in module.modules())


def faults() -> set[str]:
    return {f for f in os.environ.get("GPU_CHECK_FAULTS", "").split(",") if f}


def install() -> None:
    import torch

    from moe_model.train import trainer

    probe = os.environ.get("GPU_CHECK_PROBE")
    kill_at = int(os.environ.get("GPU_CHECK_KILL_AT", "0"))
    set_up, step, finish = trainer.Trainer.set_up, trainer.Trainer.step, trainer.Trainer.finish

    def patched_set_up(self) -> None:
        set_up(self)
        module = self.engine.module
        if "backend" in faults() and self.first_step == 0 and self.layout.moe_backend == "autoep":
            layer = next(m for m in module.modules() if type(m).__name__ == "AutoEPMoELayer")
            with torch.no_grad():
                for p in layer.parameters():
                    if p.ndim == 3:  # the experts' stacked weights [E/ep, ., .]
                        p.mul_(1.01)
        if "resume" in faults() and self.first_step > 0:
            with torch.no_grad():
                embed = next(p for n, p in module.named_parameters() if "embed_tokens" in n)
                embed.add_(0.01 * torch.randn_like(embed))
        if probe and self.rank == 0:
            Path(probe).write_text(json.dumps({"autoep_layers": autoep_layers(module),
                                               "module_class": type(module).__name__,
                                               "first_step": self.first_step}))

    def patched_step(self, index: int) -> None:
        if kill_at and self.first_step == 0 and index + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        step(self, index)

    def patched_finish(self, wall_s: float) -> None:
        if probe and self.layout.pp == 1:  # a pipeline engine's module returns no logits (its last stage, a loss)
            module = self.engine.module
            module.eval()
            with torch.no_grad():
                out = module(input_ids=probe_ids(self.recipe.model.vocab_size, self.engine.device), use_cache=False)
            module.train()
            if self.rank == 0:
                torch.save(out.logits.float().cpu(), probe + ".logits.pt")
        finish(self, wall_s)

    trainer.Trainer.set_up, trainer.Trainer.step, trainer.Trainer.finish = patched_set_up, patched_step, patched_finish


if __name__ == "__main__":
    install()
    from moe_model.train.main import main

    sys.exit(main())

"""Measures this machine and finished runs for the performance model (`moe calibrate`); may launch ranks.

machine.py   this machine's rates, links and a step's fixed cost, for a recipe's layout
refit.py     the rates refitted from a finished run's metrics.jsonl (`--from RUN_DIR`)
predict.py   the performance model's step time under measured rates
work_probe.py, comm_probe.py   rank programs (`deepspeed --module moe_model.calibrate.work_probe ...`)
timing.py    the one wall-clock timing helper of all of them

It feeds figures back to estimate/ (as `--set hardware.*` overrides); estimate/ imports nothing of it.
"""

from .machine import fit_mfu, measure_link_gbps, measure_machine, measure_step_overhead_s, measure_work, shrunken
from .predict import calibrated_prediction, hardware_rates, predict_step_s
from .refit import measured_imbalance, measured_step_time, refit, refit_factor, refit_overrides, run_recipe

__all__ = [
    "calibrated_prediction", "fit_mfu", "hardware_rates", "measure_link_gbps", "measure_machine",
    "measure_step_overhead_s", "measure_work", "measured_imbalance", "measured_step_time", "predict_step_s", "refit",
    "refit_factor", "refit_overrides", "run_recipe", "shrunken",
]

# Everything starts from a fresh machine: the first target that needs Python builds .venv by itself.
# .venv is reused while pyproject.toml is unchanged and rebuilt from scratch when it changes.
#
# TORCH is what pip installs first. The default is the CPU build these development machines carry on local disk;
# on a GPU machine the same pin resolves to PyPI's CUDA build (see README, "GPU machines").

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export WANDB_SILENT ?= true

CORPUS := data/python_docs.jsonl

.PHONY: install test test-fast smoke plan bench bench-gpu gpu-check step-time published-runs configs lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# a real text corpus built from the Python standard library's docstrings: no download, the same on every machine
$(CORPUS): scripts/build_corpus.py | $(STAMP)
	$(BIN)/python scripts/build_corpus.py -o $@

# the suite, the smoke run and the step-time accuracy are CPU-rank work (gloo, fp32) on any machine: on a CUDA machine
# DeepSpeed would otherwise pick NCCL, and the CPU recipes and probes are not meant for it (make gpu-check is)
CPU_RANKS := DS_ACCELERATOR=cpu

# TEST_WORKERS pytest-xdist workers: a launch's start-up (the launcher's and each rank's imports) leaves a core idle
# much of the time, which a second test fills (measured: 20 min 52 s -> 17 min 53 s for the multirank tests on 2
# cores); tests/conftest.py runs the rank-starting tests first and each shared reference run once for all workers.
# (3 on 2 cores measured no faster: 15 min 50 s against 15 min 40 s)
TEST_WORKERS ?= 2
# the full suite (CI; its log names the 15 slowest tests, where the 15-minute aim is kept or lost); test-fast leaves
# out every test that starts deepspeed ranks (marked multirank; tests/conftest.py refuses a launch from an unmarked
# test), for the edit-test loop
test: $(STAMP) $(CORPUS)
	$(CPU_RANKS) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15

test-fast: $(STAMP) $(CORPUS)
	$(CPU_RANKS) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not multirank"

# 4 CPU ranks (pipeline 2 x data 2, experts split over 2) on the corpus, then the report's PNGs
smoke: $(STAMP) $(CORPUS)
	$(CPU_RANKS) $(BIN)/moe train recipes/tiny_text.yaml
	$(BIN)/moe report runs/tiny-text

# the seed plan's review (docs/seed_plan_review.md, generated and committed) and its audit (exit 1: wrong claims)
plan: $(STAMP)
	$(BIN)/python -m moe_model.report.seed_review
	$(BIN)/moe audit recipes/seed_plan.yaml || test $$? -eq 1

# speed tables (and JSON in benchmarks/results/): the model against transformers' Mixtral and the machine's GEMM rate,
# DeepSpeed's 1-rank engine against the bare model, both allocator modes (see benchmarks/moe_speed.py), and
# DeepSpeed's MoE layer on 2 expert-parallel CPU ranks, stock against the project's. About 15 minutes here.
bench: $(STAMP)
	$(BIN)/python benchmarks/moe_speed.py
	$(BIN)/python benchmarks/moe_speed.py --allocator heap --parts mixtral
	$(BIN)/python benchmarks/ds_moe_layer.py

# the same on a GPU machine: bf16, tokens/s and MFU against PEAK_TFLOPS (the card's dense bf16 peak)
GPUS ?= 1
PEAK_TFLOPS ?= 989
# the one check a session lent a GPU runs first (under 8 minutes on one GPU), exit 1 on any red row: per MoE backend
# a bf16 run, the same run killed and resumed, moe export's logits and the AutoEP layers of the live engine; the
# backends' curves against each other (bf16, and an fp32 pair at 1e-4); each memory case in its own process; MFU
# above MFU_FLOOR of PEAK_TFLOPS; the model against transformers' Mixtral; with 2+ GPUs, ep > 1 and pp 2 on all.
# One table, JSON in benchmarks/results/gpu_check.json, logs in runs/gpu-check/. GPUs that torch cannot use
# (a CPU-only torch build): exit 1 with the versions and the fix. No GPU at all: one line, exit 0.
MFU_FLOOR ?= 0.05
gpu-check: $(STAMP)
	$(BIN)/python scripts/gpu_check.py --peak-tflops $(PEAK_TFLOPS) --mfu-floor $(MFU_FLOOR)

# the performance model against measured CPU runs of the tiny recipe, 1 and 4 ranks (moe calibrate, then training)
step-time: $(STAMP)
	$(CPU_RANKS) $(BIN)/python benchmarks/step_time_accuracy.py

# published GPU measurements beside the model's predictions for DeepSpeed (sources in benchmarks/published_runs_data.py)
published-runs: $(STAMP)
	$(BIN)/python benchmarks/published_runs.py

bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/moe_speed.py --device cuda --peak-tflops $(PEAK_TFLOPS)
	$(BIN)/python benchmarks/ds_moe_layer.py --gpus $(GPUS)

# style (ruff) and which way the imports run (import-linter: the contracts in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check moe_model scripts tests benchmarks
	$(BIN)/lint-imports

configs: $(STAMP)
	@for recipe in recipes/*.yaml; do \
		out=ds_configs/$$(basename $$recipe .yaml).json; \
		$(BIN)/moe config $$recipe -o $$out && echo "wrote $$out"; \
	done

clean:
	rm -rf $(VENV) runs data .pytest_cache

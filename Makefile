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

.PHONY: install test smoke configs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

smoke: $(STAMP)
	$(BIN)/moe train recipes/tiny_cpu.yaml

configs: $(STAMP)
	@for recipe in recipes/*.yaml; do \
		out=ds_configs/$$(basename $$recipe .yaml).json; \
		$(BIN)/moe config $$recipe -o $$out && echo "wrote $$out"; \
	done

clean:
	rm -rf $(VENV) runs .pytest_cache

# pellucid — two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision builds that install from this project's machines' local disk; override on other machines,
# e.g. `make test TORCH="torch torchvision"`. setup.cfg itself only asks for torch>=2.3.
ifeq ($(shell uname -m),aarch64)
TORCH ?= torch==2.9.1 torchvision==0.24.1
else
TORCH ?= torch==2.14.1 torchvision==0.29.1
endif
export WANDB_ERROR_REPORTING := false

.PHONY: install demo test check-install lint figures benchmark clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install  ## ProtoPNet on the 2D phantom: train, explain every prediction, report card, offline W&B run (./wandb)
	$(BIN)/pellucid demo

test: install  ## run the test suite
	$(BIN)/python -m pytest

check-install: install  ## build the wheel, install it into a fresh venv outside the checkout, run the user's commands
	TORCH="$(TORCH)" .ci/check_install $(BIN)/python

lint: install
	$(BIN)/ruff check .

figures: install  ## regenerate the README figures
	$(BIN)/python -m pellucid.training.data.phantom_figure --out docs/phantom_samples.png

benchmark: install  ## phantom generation speed (one core)
	$(BIN)/python benchmarks/phantom_speed.py

clean:
	rm -rf $(VENV) lightning_logs wandb outputs .pytest_cache

# Two entry points (README): `make demo` (the main job) and `make test` (the test suite).
# Both create .venv and install the project with its pinned dependencies on first use.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_AUTH_MODE := disabled

.PHONY: install demo test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/icf demo

test: install
	$(BIN)/python -m pytest -q

bench: install
	for b in "pipeline.py --quick" cdcl.py "loader.py --clips 24" train_step.py "train_speed.py --steps 3" "profile_step.py --steps 1 --top 10"; do echo "== $$b"; $(BIN)/python bench/$$b || exit 1; done

clean:
	rm -rf $(VENV) icf-work

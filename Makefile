# Two entry points, both self-contained on a fresh Linux machine with Python 3.10+:
#   make demo   - set up .venv and run the main job on the bundled model
#   make test   - set up .venv and run the test suite
# The virtual environment is created once and reused; `make clean` removes it.
PYTHON ?= python3
VENV   ?= .venv
# torch is pinned to the CPU build that fits this project's CI machines; on your own
# machine pick the build you need: make TORCH_SPEC="torch --index-url ..." or a preinstalled one.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmkiln-installed

.PHONY: demo test clean bench

# (setuptools >= 84 prints a notice box on every editable install, warning that a folder named like the
#  package could shadow it; there is none here, src/ is the package: filtered by its message)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	PYTHONWARNINGS="$${PYTHONWARNINGS:+$$PYTHONWARNINGS,}ignore:Editable installation" $(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lmkiln demo --workdir build/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build

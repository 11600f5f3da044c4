# Quick start: `make demo` and `make test` each set everything up from scratch (a virtual
# environment in .venv, torch, pyro_ext and its extras), then run the demo or the tests.
PYTHON ?= python3
VENV ?= .venv
# CPU build of torch; a GPU user sets TORCH_SPEC to the build they want (see README).
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.pyro_ext-installed

.PHONY: demo test lint benchmark clean setup

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: installed on its own, pip takes the pinned build instead of resolving a default one
	$(BIN)/python -m pip install --quiet $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,tutorials]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pyro_ext.demo

# Lint, then the tests. pytest exits with 5 when it collects no test: a failure here, said plainly.
test: $(STAMP)
	$(BIN)/ruff check .
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

benchmark: $(STAMP)
	$(BIN)/python -m benchmarks $(NAME)

clean:
	rm -rf $(VENV) demo_output .pytest_cache build *.egg-info

# Two entry points for a fresh machine (see README Quickstart): `make demo` and `make test` (`make test-fast`
# skips the tests marked slow).
# Both create .venv on first use; torch/torchvision are pinned to the builds known to pair on this platform.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-stamp
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-fast clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $(TORCH_PINS)
	$(VENV)/bin/pip install --quiet -e '.[dev,demo,docs]' $(TORCH_PINS)
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/cgd-demo $(DEMO_ARGS)

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/bin/pytest -m 'not slow' $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

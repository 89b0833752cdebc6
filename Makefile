# Two commands work on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and installs the pinned versions first.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup test test-slow demo protos sync-client bench perf-analyzer clean

setup: $(STAMP)

# Reinstall when the dependencies change. torch and torchvision are pinned in
# constraints.txt (a CUDA build of several GB; on this kind of machine pip takes
# it from local disk).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[server,dev,report]'
	touch $@

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

demo: setup
	$(PY) scripts/demo.py

# Regenerate client/tlserve/** from protos/ (tests/test_protos.py checks they are fresh).
protos: setup
	$(PY) scripts/gen_protos.py

# client/_client.py (the sync Client) is written from client/_aio.py: edit that one.
sync-client: setup
	$(PY) scripts/gen_sync_client.py

# Triton's perf_analyzer into var/tools/perf_analyzer (bench/predict.py uses it there).
perf-analyzer: setup
	scripts/get_perf_analyzer.sh

clean:
	rm -rf $(VENV) var .pytest_cache

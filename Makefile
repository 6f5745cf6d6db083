# Two entry points for a fresh clone: `make demo` and `make test`. Both create .venv in the repo root.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the releases this machine holds on disk (CPU use; CUDA when present).
TORCH := torch==2.14.1 torchvision==0.29.1
# surgery: torch, open_clip... (the plain install only serves ONNX exports); serve: gRPC; test: pytest, ruff
EXTRAS ?= surgery,serve,oip,test

# Tests run on every core (pytest-xdist), one test file per worker at a time so module fixtures (gRPC servers,
# pruned runs) are built once; one torch thread per worker, as many workers as cores.
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -n auto --dist loadfile --no-loadscope-reorder

.PHONY: setup demo test test-fast lint typecheck clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/surgeon prune --policy debias --export onnx

# everything: lint, types and every test, slow ones included
test: setup
	$(VENV)/bin/ruff check surgeon tests benchmarks
	$(PY) -m mypy
	$(PYTEST)

# the edit loop: every test not marked slow (about 100 s on 2 cores; `make test`: 5 min 5 s to 5 min 28 s of pytest from a clean clone, 860 tests)
test-fast: setup
	$(PYTEST) -m "not slow"

lint: setup typecheck
	$(VENV)/bin/ruff check surgeon tests benchmarks
	$(VENV)/bin/ruff format --check surgeon tests benchmarks

typecheck: setup
	$(PY) -m mypy

clean:
	rm -rf $(VENV) build *.egg-info

# Two commands on a fresh machine: `make demo` and `make test`. Both create or reuse .venv.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install demo test test-fast clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	@$(BIN)/python -c "import torch; c = torch.version.cuda; print('installed torch', torch.__version__, '(CUDA %s build' % c if c else '(CPU-only build', '- the index has no CPU build of it; see README)' if c and not torch.cuda.is_available() else ')')"
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job: the chat demo on the built-in tiny model (see README).
demo: $(STAMP)
	$(BIN)/llava-drip demo

# One compute thread per test process: the tests' tensors are tiny, and two threads per process on two cores
# (DeepSpeed tests run two ranks) spend more time contending than computing. Set OMP_NUM_THREADS to override.
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

test-fast: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -ra -m "not slow and not browser" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

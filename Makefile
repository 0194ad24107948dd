# The README's two commands for a fresh machine: `make demo` and `make test`.
# Each sets up .venv on first use (torch CPU wheel first, then volpre with its test extras).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel that lies on this machine's disk; GPU users set TORCH_SPEC to their CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo_run

.PHONY: demo test setup clean

setup: $(VENV)/.installed

# Every install after torch's runs under a constraint on the torch just installed: the test extra
# holds nnU-Net, whose timm -> torchvision would otherwise replace the CPU torch with a CUDA build.
$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -c 'import torch; print("torch==" + torch.__version__)' > $(VENV)/torch-constraint.txt
	$(PY) -m pip install --quiet -e ".[test]" -c $(VENV)/torch-constraint.txt
	touch $@

demo: setup
	$(PY) -m volpre demo --out $(DEMO_OUT)

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache

# Zebra developer entry points (GNU make). Everything runs from a venv at .venv in this repo:
#
#   make install   create .venv, install torch (CPU build) + zebra[test], fetch the offline assets
#   make test      the fast CPU test suite (pytest -q)
#   make test-compat  model + generation tests under the oldest supported transformers (own venv .venv-compat)
#   make demo      the embedded end-to-end demo (`zebra demo`)
#   make clean     remove .venv and build / test leftovers (the asset cache stays, see zebra/assets.py)
#
# Re-running `make install` is a no-op until pyproject.toml changes (stamp file .venv/.installed).
# TORCH_SPEC pins torch first: an unpinned torch would pull a multi-GB CUDA build; here pip's local
# wheel dir / index provides the 2.13.0 CPU build (GPU machines: make install TORCH_SPEC='torch>=2.11').

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ZEBRA := $(VENV)/bin/zebra
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0

OLDEST_TRANSFORMERS ?= 5.17.0
COMPAT := .venv-compat

.PHONY: install test test-compat demo fetch clean clean-cache

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install '$(TORCH_SPEC)'
	$(PY) -m pip install -e '.[test]'
	$(ZEBRA) assets fetch
	touch $@

test: install
	$(PY) -m pytest -q

# The model and generation tests again under the oldest supported transformers, in their own venv (CI runs both).
test-compat:
	test -x $(COMPAT)/bin/python || $(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install -q '$(TORCH_SPEC)'
	$(COMPAT)/bin/python -m pip install -q 'transformers==$(OLDEST_TRANSFORMERS)' safetensors accelerate gguf pyyaml \
		tqdm numpy matplotlib pytest pytest-timeout
	$(COMPAT)/bin/python -m pip install -q --no-deps -e .
	$(COMPAT)/bin/python -c "import transformers; assert transformers.__version__ == '$(OLDEST_TRANSFORMERS)', transformers.__version__"
	$(COMPAT)/bin/python -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_engine.py tests/test_parity.py tests/test_standalone.py

demo: install
	$(ZEBRA) demo

fetch: install
	$(ZEBRA) assets fetch

clean:
	rm -rf $(VENV) $(COMPAT) .pytest_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +

# Removes the downloaded wheels, unpacked data and converted teacher ($ZEBRA_CACHE or ~/.cache/zebra).
clean-cache:
	rm -rf "$${ZEBRA_CACHE:-$$HOME/.cache/zebra}"

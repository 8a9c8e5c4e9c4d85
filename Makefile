# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default; e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124" for CUDA.
TORCH_SPEC ?= torch==2.13.0
FASHION_DIR ?= /usr/share/datasets/fashion-mnist
# Test processes (pytest-xdist, whole files per process): the cores, at most 4.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: venv test demo fashion-data clean-venv bench

# The runtime (what `make demo` needs), then the test extras on top.
# --no-compile: byte-compiling every installed module (torch's thousands) is
# two thirds of the install's time, and the demo imports a small part of them,
# which Python compiles on first import. The test venv compiles everything, on
# all cores, since the tests start many processes; files that do not compile
# on this Python (torch ships tests in newer syntax) are skipped, as pip does.
SITE_PACKAGES = $$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --no-compile $(TORCH_SPEC)
	$(PY) -m pip install -q --no-compile -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q --no-compile -e ".[test]"
	$(PY) -m compileall -qq -j 0 $(SITE_PACKAGES) || true
	touch $@

venv: $(VENV)/.installed-test

test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

fashion-data:
	@test -d $(FASHION_DIR) || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

bench: venv
	$(PY) benchmarks/benchmark_sampling.py

clean-venv:
	rm -rf $(VENV)

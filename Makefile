# Two commands for a fresh machine: `make demo` (install + demo) and `make test` (install + tests).
# On a CPU machine the CPU wheel torch==2.13.0 is installed (an unpinned torch pulls a multi-GB CUDA
# build); where a torch is already importable (a GPU machine), it is used as it is.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test test-slow test-newest test-fast bench-cpu

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	@$(PYTHON) -c "import triton" 2>/dev/null || $(PIP) install -q triton || echo "triton unavailable: kernel tests will be skipped"
	$(PIP) install -q --no-build-isolation -e ".[app,test]"
	@$(PYTHON) -c "from sgflow.ops import cpp_ext as e; print('sgflow._C (C++ kernels, backend cpp):', 'built' if e.available() else 'NOT built: ' + e.reason())"

demo: install
	$(PYTHON) -m sgflow.cli demo --out demo_out

# The suite without the tests marked slow (a fault-injection loop, the cifar10 U-Net's memory and compiled
# steps: ~2 min together); CI runs both targets.
test: install
	$(PYTHON) -m pytest -q -p no:cacheprovider -m "not slow" tests

test-slow: install
	$(PYTHON) -m pytest -q -p no:cacheprovider -m slow tests

# The whole suite on the newest torch setup.py allows (torch==2.14.1), in a fresh virtual environment .venv-newest.
# --use-pep517: with the venv's own pip and a new setuptools, a legacy editable install re-runs pip with build
# isolation (no torch there) and sgflow._C silently goes unbuilt; ninja: torch's BuildExtension needs it.
# Its editable install rebuilds sgflow._C in python/sgflow/ against that torch: `make install` (or `make test`)
# rebuilds it for the pinned one.
NEWEST_TORCH ?= 2.14.1
test-newest:
	$(PYTHON) -m venv .venv-newest
	.venv-newest/bin/python -m pip install -q "torch==$(NEWEST_TORCH)" triton setuptools wheel ninja
	SGFLOW_BUILD_CUDA=0 .venv-newest/bin/python -m pip install -q --no-build-isolation --use-pep517 -e ".[app,test]"
	.venv-newest/bin/python -c "import torch; from sgflow.ops import cpp_ext as e; print('torch', torch.__version__, '| sgflow._C:', 'built' if e.available() else 'NOT built: ' + e.reason())"
	.venv-newest/bin/python -m pytest -q -p no:cacheprovider tests

bench-cpu: install
	$(PYTHON) -m pytest -q -p no:cacheprovider benchmarks/test_cpu_benchmarks.py --benchmark-json=benchmarks/results/cpu.json
	$(PYTHON) benchmarks/memory.py --device cpu --config tiny --batch 8 --out benchmarks/results/memory_cpu

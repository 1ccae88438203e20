# Two commands do all the setup on a fresh machine:
#   make demo   - the main job: AnyMS end to end on the built-in tiny offline model
#   make test   - the test suite (CPU; the Triton kernel runs under TRITON_INTERPRET=1)
# TORCH_SPEC picks the torch build: the default is the CPU build; on a CUDA machine
# use e.g. `make test TORCH_SPEC=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo test bench bench-pipeline compile-report clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[triton,diffusers,viz,test,bench]"
	touch $@

# anyms-demo/ is this target's own folder: made again each time
demo: $(VENV)/.installed
	$(VENV)/bin/anyms demo --overwrite

test: $(VENV)/.installed
	$(PY) -m pytest tests -q

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_region_attention.py --device cpu

bench-pipeline: $(VENV)/.installed
	$(PY) benchmarks/bench_pipeline.py

compile-report: $(VENV)/.installed
	env -u TRITON_INTERPRET $(PY) benchmarks/compile_report.py

clean:
	rm -rf $(VENV) build *.egg-info

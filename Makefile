# dino_scale developer entry points. `make test` is the CI command.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BENCH_OUT ?= runs/bench-cpu
# Free disk the first venv build asks for: the venv is ~6.6 GB (torch's CUDA build), a test run
# needs ~1 GB more. Checked before a new venv is made, so a full disk fails in a second with the
# numbers instead of in pip minutes later (ENOSPC half-way through an install).
MIN_FREE_GIB ?= 8
# pytest-xdist workers of `make test`: the tests that start Ray (tests/conftest.py, RAY_MODULES)
# run on one of them, in order, the rest on the others (and on that one once its group is done);
# 0 runs everything in this process.
TEST_WORKERS ?= 2

.PHONY: venv test demo clean bench-cpu

venv: $(STAMP)

# Idempotent: the venv is created once; the project is reinstalled only when
# pyproject.toml changes. torch/torchvision are pinned first (a pair timm needs).
# The libraries the engine leans on at the versions in cluster/constraints.txt (the image's too).
$(STAMP): pyproject.toml cluster/constraints.txt
	@test -x $(PY) || $(PYTHON) -c 'import os, shutil, sys; \
	d = os.path.dirname(os.path.abspath("$(VENV)")); \
	d = d if os.path.isdir(d) else next(p for p in __import__("pathlib").Path(d).parents if p.is_dir()); \
	free = shutil.disk_usage(d).free / 2**30; \
	sys.exit(None if free >= $(MIN_FREE_GIB) else \
	f"make: {free:.1f} GiB free under {d}; a new venv needs {$(MIN_FREE_GIB)} GiB (about 6.6 for " \
	"the venv, torch being a CUDA build, and the rest for a test run). Free some disk (df -h) or " \
	"set MIN_FREE_GIB.")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile --upgrade pip
	$(PY) -m pip install -q --no-compile "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q --no-compile -c cluster/constraints.txt -e ".[dev]"
	@# bytecode on every core (pip compiles on one: the venv took 172 -> 137 s on a 2-core box);
	@# a few vendored Python-2 templates do not compile, which pip ignores too
	-$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1
	touch $(STAMP)

test: $(STAMP)
	DS_ACCELERATOR=cpu DINO_SCALE_TEST_HARD_EXIT=1 $(PY) -m pytest -q --durations=20 \
		-n $(TEST_WORKERS) tests

demo: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m pipelines.demo

# The benchmarks' CPU modes at small sizes (a few minutes on 2 cores; a smoke check, not the
# measured numbers). JSON goes to $(BENCH_OUT), never over the files in benchmarks/results/.
bench-cpu: $(STAMP)
	mkdir -p $(BENCH_OUT)
	DS_ACCELERATOR=cpu $(PY) benchmarks/msda.py --device cpu --small --out $(BENCH_OUT)/msda.json
	DS_ACCELERATOR=cpu $(PY) benchmarks/matcher.py --devices cpu --repeats 5 --out $(BENCH_OUT)/matcher.json
	DS_ACCELERATOR=cpu $(PY) benchmarks/train_step.py --device cpu --preset tiny --iters 5 --warmup 1 \
		--height 256 --width 384 --out $(BENCH_OUT)/train_step.json
	DS_ACCELERATOR=cpu $(PY) benchmarks/op_count.py --out $(BENCH_OUT)/op_count.json
	DS_ACCELERATOR=cpu $(PY) benchmarks/data_pipeline.py --small --results-dir $(BENCH_OUT)

clean:
	rm -rf $(VENV) build *.egg-info

# The two commands a new machine needs: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

# Network rule: DDS discovery stays on this host, and every run gets its own domain.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
ifndef ROS_DOMAIN_ID
ROS_DOMAIN_ID := $(shell echo $$(( ($$$$ % 90) + 10 )))
endif
export ROS_DOMAIN_ID

.PHONY: setup demo test bench bench-full soak embedded gpu-check clean

setup:
	@bash scripts/setup_venv.sh

demo: setup
	$(PY) -m phi3v_spatial.ros.demo

test: setup
	$(PY) -m pytest -q -ra

# Engine reuse vs the naive path, side by side (embedded model, a few minutes at most on 2 CPU cores).
bench: setup
	$(VENV)/bin/phi3v-spatial bench

# The same with the full-size CLIP ViT-L/14-336 tower (random weights, small LM): slow on a CPU.
bench-full: setup
	$(VENV)/bin/phi3v-spatial bench --model full-vision --repeat 1

# The load test: spatial_node on the embedded model, two 15 Hz cameras, three mixed clients, lifecycle cycles;
# a table at the end (exit 1 on a lost request, a traceback or a NaN success). Shorter: SOAK_ARGS="--duration 120 --warmup 30".
SOAK_ARGS ?= --duration 1800 --warmup 300
soak: setup
	$(VENV)/bin/phi3v-spatial soak $(SOAK_ARGS)

# Rebuilds the embedded demo model in models/ from scratch (about 74 minutes on this project's 2-core machine on a
# slow day, summed over the stages of the committed build; its speed varies from day to day by up to 1.3x).
embedded: setup
	$(VENV)/bin/phi3v-spatial build-embedded --out models

# The CUDA paths and real-size speed in one short run on a GPU machine (prints "no CUDA device: skipped" without one).
# Needs no .venv and no ROS: any python that imports torch (PYTHON=... to choose), the package from this folder.
PYTHON ?= $(or $(shell for p in python3 $(VENV)/bin/python python; do $$p -c 'import torch' >/dev/null 2>&1 && { echo $$p; break; }; done),python3)
gpu-check:
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) scripts/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf build .pytest_cache

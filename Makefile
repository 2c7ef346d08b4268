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

.PHONY: setup demo test bench embedded clean

setup:
	@bash scripts/setup_venv.sh

demo: setup
	$(PY) -m phi3v_spatial.ros.demo

test: setup
	$(PY) -m pytest -q -ra

bench: setup
	$(PY) benchmarks/bench_engine.py

# Rebuilds the embedded demo model in models/ from scratch (about 30-45 minutes on 2 CPU cores).
embedded: setup
	$(VENV)/bin/phi3v-spatial build-embedded --out models

clean:
	rm -rf build .pytest_cache

# mobile_vla — every target sets itself up (apt, pip, cargo) and is idempotent.
#   make demo    the end-to-end demo on embedded defaults
#   make study   the fine-tuning strategies compared on the demo's loop
#   make test    cargo tests + rclpy integration tests (what CI runs)
#   make bench   benchmarks against the PyTorch reference
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
ROOT := $(CURDIR)
export CARGO_TARGET_DIR ?= $(ROOT)/target
BIN_DIR := $(CARGO_TARGET_DIR)/debug
RELEASE_BIN_DIR := $(CARGO_TARGET_DIR)/release
ENV := source $(ROOT)/scripts/env.sh
NODE_BINS := mobile_vla echo_node recorder_node policy_node trainer_node
PY := $(ENV) && python
# Loopback-only DDS and a domain of our own for every ROS process started here.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export ROS_DOMAIN_ID ?= 73

.PHONY: setup setup-sim build build-release test test-rust test-python demo study bench lint fmt colcon-check clean

setup:
	@bash scripts/setup.sh

# The simulator's extras (MuJoCo, osmesa, mcap): only for the targets that run it.
setup-sim: setup
	@bash scripts/setup.sh sim

# Also links the executables into install/lib/mobile_vla, where `ros2 run` and
# launch files look for them, so the dev tree works like an installed package.
build: setup
	@bash scripts/r2r-bindings-check.sh
	@$(ENV) && cargo build --features ros --all-targets
	@mkdir -p install/lib/mobile_vla && for b in $(NODE_BINS); do ln -sfn $(BIN_DIR)/$$b install/lib/mobile_vla/$$b; done

# The demo and study train and drive with release executables: the packed GEMM and the fused training
# ops are this crate's own code, which the dev profile leaves unoptimised (training ~4x slower).
build-release: setup
	@bash scripts/r2r-bindings-check.sh
	@$(ENV) && cargo build --release --features ros --bins

test-rust: build
	@$(ENV) && cargo test --features ros

test-python: build setup-sim
	@$(ENV) && MOBILE_VLA_BIN_DIR=$(BIN_DIR) python -m pytest -q -p no:cacheprovider test/python

# Rust first, then the rclpy integration tests; pytest's summary line closes the run.
test: test-rust test-python

lint: setup
	@$(ENV) && cargo fmt --check && cargo clippy --features ros --all-targets -- -D warnings

fmt:
	@cargo fmt

# Simulated loop (scripts/demo.py; one step alone: python scripts/demo.py <step>); outputs in out/demo/.
demo: build-release
	@bash scripts/setup.sh demo
	@$(ENV) && MOBILE_VLA_BIN_DIR=$(RELEASE_BIN_DIR) python scripts/demo.py $(DEMO_ARGS)

# The strategy study (≤ 60 min): pretrain on another simulated task, then full / last-N / LoRA / frozen
# fine-tuning on the demo's episodes (recorded first if out/demo has none), each driven by policy_node.
study: build-release
	@bash scripts/setup.sh demo
	@$(ENV) && MOBILE_VLA_BIN_DIR=$(RELEASE_BIN_DIR) python scripts/demo.py study $(STUDY_ARGS)

# policy_step runs the full Kosmos-2 shape too (minutes, ~7 GB); MOBILE_VLA_BENCH_FULL=0 skips it.
# Then policy_node end to end against the library's step (benches/policy_node_latency.py, release build).
bench: build
	@bash scripts/torch-venv.sh
	@$(ENV) && cargo bench --features ros
	@$(ENV) && cargo build --release --features ros --bin mobile_vla --bin policy_node
	@$(ENV) && MOBILE_VLA_BIN_DIR=$(RELEASE_BIN_DIR) python benches/policy_node_latency.py

# The real-ROS path: a colcon workspace with this package, built as a user would.
colcon-check: setup
	@bash scripts/colcon-check.sh

clean:
	rm -rf build install log target

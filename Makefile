# Entry points; the logic lives in hack/ scripts and cargo.
SHELL := /bin/bash
STATE_DIR ?= $(or $(XDG_STATE_HOME),$(HOME)/.local/state)/inventory-outbox
ENV_FILE := $(STATE_DIR)/env.sh
# One target dir outside the work tree, shared by every clone on this machine (CI included).
export CARGO_TARGET_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/inventory-outbox/target
# Tests run against the stack; two cores, so keep test threads modest (at 4 the load average
# reached 15 while several tests each drive brokers, relays and Pods).
TEST_THREADS ?= 3
# Failure messages carry the state that explains them; CI shows only the head and tail of a
# failed test's output, and a backtrace there pushed the message out. TEST_BACKTRACE=1 brings
# backtraces back.
TEST_BACKTRACE ?= 0

.PHONY: env-up env-down env-status test lint chart-check unit-test integration-test demo demo-clean bench

env-up:
	hack/env-up.sh

env-down:
	hack/env-down.sh

env-status:
	hack/env-status.sh

lint:
	cargo fmt --check
	cargo clippy --all-targets --locked -- -D warnings

# The chart (helm lint, helm-unittest, promtool) and the Dockerfile (hadolint).
chart-check:
	hack/chart-check.sh

unit-test:
	cargo test --locked --lib --bins

integration-test:
	source $(ENV_FILE) && RUST_BACKTRACE=$(TEST_BACKTRACE) cargo test --locked --test integration -- --test-threads=$(TEST_THREADS)

# The README's test command: stack up, formatting, lints (all targets, benches included),
# chart and Dockerfile checks, then every test. Benchmarks are compiled by clippy but run only by `cargo bench`.
test: env-up lint chart-check
	source $(ENV_FILE) && RUST_BACKTRACE=$(TEST_BACKTRACE) cargo test --locked --lib --bins --tests --examples -- --test-threads=$(TEST_THREADS)

# Benchmarks against the local stack; figures go to BENCHMARKS.md.
bench: env-up
	source $(ENV_FILE) && cargo bench --locked --bench publish && cargo bench --locked --bench relay

# The README's demo command: the chart's operator as a Pod, the Kafka example, events flowing,
# a Kafka outage (circuit open, pending growing, then closed with nothing lost), a replay.
# DEMO_KEEP=1 leaves it running; demo-clean removes it.
demo:
	hack/demo.sh

demo-clean:
	hack/demo.sh clean

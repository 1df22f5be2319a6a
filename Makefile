# Developer entry points for fanfinity. The local stack (ClickHouse 18.16 and the Tansu
# broker, both on 127.0.0.1) is run by scripts/stack.sh; see docs/local-stack.md.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
STACK := scripts/stack.sh
MATCH ?= loadtest/matches/wc2022-final.json

# Exports FANFINITY_* pointing at the local stack (variables already set are kept).
stack_env = eval "$$($(STACK) env)"
# glommio locks memory per executor. Only a root with CAP_SYS_RESOURCE may lift the hard
# limit; otherwise the soft limit is raised to the hard one.
raise_memlock = ulimit -l unlimited 2>/dev/null \
	|| ulimit -S -l "$$(ulimit -H -l)" 2>/dev/null || true

.PHONY: help stack-up stack-down stack-status build run test replay lint clean-stack

help:
	@echo 'make stack-up      start ClickHouse and Tansu on loopback (installs what is missing)'
	@echo 'make stack-down    stop them, keeping data'
	@echo 'make stack-status  show whether each is up (fails if one is down)'
	@echo 'make build         cargo build --release --workspace'
	@echo 'make run           stack-up, then run fanfinity serve in the foreground'
	@echo 'make test          stack-up, all tests incl. stack-tests, then make replay'
	@echo 'make replay        replay $(MATCH) against a fanfinity it starts'
	@echo 'make lint          cargo fmt --check and clippy -D warnings'
	@echo 'make clean-stack   stop the stack and delete its data and logs'

stack-up:
	$(STACK) up

stack-down:
	$(STACK) down

stack-status:
	$(STACK) status

build:
	$(CARGO) build --release --workspace

# exec hands the terminal's Ctrl-C straight to cargo and the server.
run: stack-up
	$(raise_memlock); $(stack_env); \
	exec $(CARGO) run --release --bin fanfinity -- serve --config scripts/dev.toml

test: stack-up
	$(raise_memlock); $(stack_env); \
	$(CARGO) test --release --workspace --features stack-tests -- --test-threads=2
	$(MAKE) replay

replay: stack-up
	scripts/replay.sh $(MATCH)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --features stack-tests -- -D warnings

clean-stack:
	$(STACK) down --wipe

# Two commands do all the set-up: `make demo` (the main job) and `make test` (every test).
# Each creates .venv with mig-core and every first-party plugin first if that is missing.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PLUGINS := $(sort $(wildcard plugins/*/pyproject.toml))
STAMP := $(VENV)/.mig-installed

.PHONY: demo test venv docs clean scale check fuzz

venv: $(STAMP)

$(STAMP): pyproject.toml $(PLUGINS)
	@# mig-tls's sslpsk3 compiles against OpenSSL's headers
	@test -f /usr/include/openssl/ssl.h || (apt-get update -qq && apt-get install -y -qq libssl-dev) >/dev/null || \
		echo "libssl-dev could not be installed: the mig-tls plugin (sslpsk3) will not build"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,bench,report]' $(foreach p,$(PLUGINS),-e $(dir $(p)))
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mig demo

test: check
	@# mig top's test drives it in tmux, as a person would use it
	@command -v tmux >/dev/null || (apt-get update -qq && apt-get install -y -qq tmux) >/dev/null || \
		echo "tmux could not be installed: mig top's terminal test will fail"
	@# two workers: most tests wait on real processes and sockets, so the suite takes half the time; each
	@# test is also run beside another, which a test that depends on an idle machine does not survive;
	@# the 20 slowest are listed at the end, to keep the suite under its 15 minutes
	$(BIN)/python -m pytest -q -n 2 --durations=20

# Lint (with import order) and type check; part of make test.
check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Long fuzzing of every decoder (make test runs the same fuzzers briefly): MIG_FUZZ_EXAMPLES per target.
fuzz: $(STAMP)
	MIG_FUZZ_EXAMPLES=$${MIG_FUZZ_EXAMPLES:-100000} MIG_FUZZ_REPORT=1 $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/fuzz
	@# then coverage-guided: atheris (libFuzzer) on the same properties, ATHERIS_RUNS inputs per decoder
	$(BIN)/python -m pip install -q 'atheris>=2.3'
	MIG_LOG_LEVEL=error $(BIN)/python tests/fuzz/coverage_guided.py all -runs=$${ATHERIS_RUNS:-100000}

# Full-size checks beside the suite (8 GiB hosts): not part of make test.
scale: $(STAMP)
	$(BIN)/python -m pytest -q -m scale

docs: $(STAMP)
	$(BIN)/python -m mig_core.qmp.reference_doc > docs/qmp-reference.md

clean:
	rm -rf $(VENV)

.PHONY: bench
bench: $(STAMP)
	MIG_LOG_LEVEL=warning $(BIN)/python -m benchmarks $(WHICH)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The lowest versions pyproject.toml allows, so that its floors stay true.
LOWEST := .venv-lowest
LOWEST_TESTS := tests/test_invalidation.py tests/test_cache.py tests/test_flow.py \
	tests/test_admin.py tests/test_upstream.py tests/test_writer.py

.PHONY: install serve test services lint lock bench clean

$(BIN)/databroker: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/databroker

# make serve SERVE_ARGS='--port 8788' (any option of databroker serve).
serve: install
	$(BIN)/databroker serve $(SERVE_ARGS)

services:
	bash .ci/services

lint: install
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench
	$(BIN)/mypy

# uv (the lock extra's) resolves every direct dependency to its floor; the rest resolve as usual.
$(LOWEST)/.installed: pyproject.toml Makefile $(VENV)/.lock
	rm -rf $(LOWEST)
	$(BIN)/uv venv --quiet --python $(PYTHON) $(LOWEST)
	$(BIN)/uv pip install --quiet --python $(LOWEST)/bin/python --resolution lowest-direct --compile-bytecode -e '.[test]'
	touch $@

# pytest exits 5 when it collects no test: that is a failure here, not a pass.
pytest = $(1) -q $(2); status=$$?; \
	if [ $$status -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$status

# The whole suite, then the subset that covers the key dependencies on their floors.
test: install services lint $(LOWEST)/.installed
	$(call pytest,$(BIN)/pytest,-n 2 --dist loadfile)
	$(call pytest,$(LOWEST)/bin/pytest,$(LOWEST_TESTS))

# The image's locks (Dockerfile): the runtime dependencies and the build backend, pinned with
# the hashes of every file PyPI has for them, resolved for the image's Linux and Python.
LOCK_PYTHON := 3.11.14
LOCK := $(BIN)/uv pip compile --quiet --generate-hashes --python-platform linux \
	--python-version $(LOCK_PYTHON) --custom-compile-command 'make lock'

$(VENV)/.lock: $(BIN)/databroker
	$(BIN)/pip install --quiet -e '.[test,lock]'
	touch $@

lock: $(VENV)/.lock
	$(LOCK) --output-file requirements.lock pyproject.toml
	$(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
		| $(LOCK) --output-file requirements-build.lock -

# wrk from Debian's packages (installed when missing), matplotlib and py-spy from the
# `bench` extra. Pass options with BENCH_ARGS, e.g. BENCH_ARGS="--memory --profile".
$(VENV)/.bench: $(BIN)/databroker
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

bench: install services $(VENV)/.bench
	@command -v wrk >/dev/null 2>&1 || { apt-get update && apt-get install -y wrk; }
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(LOWEST) .databroker .pytest_cache .mypy_cache .ruff_cache

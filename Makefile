# Klio: `make run` runs the whole system on its embedded default, `make test` runs every test.
# Both first build .venv/ (Debian's python3.11, so the PostgreSQL OS user can run it: pitfall P17).

PYTHON ?= /usr/bin/python3.11
VENV := .venv
BIN := $(VENV)/bin
PACKAGES := libs/klio_common libs/klio_restore cli services/wal-receiver services/basebackup \
            services/relay services/retention devtools
PYPROJECTS := $(addsuffix /pyproject.toml,$(PACKAGES))
PYTEST_ARGS ?=

.PHONY: run test lint typecheck unit venv system-deps lock bench clean

run: $(VENV)/.installed
	$(BIN)/python -m klio_dev.embedded

test: $(VENV)/.installed lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy libs/klio_common/src libs/klio_restore/src cli/src services/*/src devtools/src tests bench
	$(BIN)/lint-imports

unit: $(VENV)/.installed
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(BIN)/python -m bench.run $(BENCH_ARGS)

venv: $(VENV)/.installed

system-deps:
	@bash .ci/system-deps

$(VENV)/.installed: requirements.lock $(PYPROJECTS) Makefile services/wal-receiver/setup.py \
                    services/wal-receiver/src/klio_wal_receiver/_turn.c
	@bash .ci/system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
	    $(addprefix -e ,$(PACKAGES))
	# restore_command runs `klio wal-restore` once per WAL segment: a wrapper without pip's
	# `import re` saves ~4 ms a call
	printf '#!%s\nimport sys\nfrom klio_cli.main import main\nsys.exit(main())\n' \
	    "$(abspath $(BIN))/python3.11" > $(BIN)/klio && chmod 755 $(BIN)/klio
	# restore_command runs as the PostgreSQL OS user, which cannot write __pycache__: compile now
	$(BIN)/python -m compileall -q -j 0 libs cli services devtools $(VENV)/lib > /dev/null
	chmod -R a+rX $(VENV) libs cli services devtools
	touch $@

# Regenerate the lock file after editing requirements.in (needs network access to PyPI).
lock:
	$(BIN)/pip install --quiet uv
	$(BIN)/uv pip compile requirements.in --python $(PYTHON) --generate-hashes -o requirements.lock

clean:
	rm -rf $(VENV) .run

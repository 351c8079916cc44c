# The two quickstart commands: `make demo` and `make test`. Each creates .venv from pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo

$(BIN)/jaxpost: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,demo]'
	touch $@

.PHONY: install demo test lint
install: $(BIN)/jaxpost

demo: install
	$(BIN)/jaxpost demo --workdir=$(WORKDIR)

lint: install
	$(BIN)/ruff check jaxpost configs tests tools
	$(BIN)/ruff format --check jaxpost configs tests tools
	if [ -f ../shared/tools/import_cycles.py ]; then $(BIN)/python ../shared/tools/import_cycles.py jaxpost; fi

test: install lint
	# huge pages for glibc malloc: XLA:CPU steps fault far less (docs/PERFORMANCE.md)
	GLIBC_TUNABLES=glibc.malloc.hugetlb=1 XLA_FLAGS=--xla_force_host_platform_device_count=8 \
		$(BIN)/pytest -q -n auto --dist worksteal tests

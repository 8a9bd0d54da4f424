# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) .venv and install the pinned environment from constraints.txt.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.torchslim-installed
DOCS_STAMP := $(VENV)/.torchslim-docs-installed

.PHONY: demo test test-all bench docs env clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[all,test]'
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/torchslim demo --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

# The documentation site, built in strict mode (a dead link, a missing anchor or a stale API name fails) into site/.
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(BIN)/python benchmarks/demo.py --json bench-results/demo.json
	$(BIN)/python benchmarks/profile_models.py --json bench-results/profile.json
	$(BIN)/python benchmarks/render.py bench-results/demo.json bench-results/profile.json --out bench-results/results.md

clean:
	rm -rf $(VENV) out bench-results site

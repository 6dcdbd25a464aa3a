# The two commands of the README: `make demo` and `make test`. Both create or refresh .venv themselves.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
FAMILY ?= llamagen
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# two pytest workers, a test file each (module fixtures run once): the miniature demo (~4.5 min) runs
# beside the rest of the suite instead of after it
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

# everything but the end-to-end runs marked slow (the miniature demo)
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

demo: $(STAMP)
	$(PY) -m distilled_decoding demo --family $(FAMILY)

clean:
	rm -rf $(VENV) demo_out

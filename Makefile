# Two commands do all set-up: `make demo` and `make test`.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.yuyan-installed
DEMO_ARGS ?=

.PHONY: demo test lint format bench clean venv browser fonts llama-cpp

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and explicitly (a bare `torch` requirement would pull a multi-GB CUDA build),
# then the package with its extras; the stamp makes a second run install nothing.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,hub,data,eval,gguf,privacy]"
	touch $(STAMP)

venv: $(STAMP)

# Debian's chromium for the browser tests (never a browser download by Playwright).
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "warning: could not install chromium; browser tests will fail"

# Debian's Noto CJK fonts, so figures with Chinese or Japanese text draw it (yuyan.plots picks the font;
# tests/test_plots.py checks a CJK label is drawn with it).
fonts:
	@fc-list 2>/dev/null | grep -q "Noto Sans CJK" || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-noto-cjk >/dev/null) || echo "warning: could not install fonts-noto-cjk; CJK figure tests will skip"

demo: $(STAMP)
	$(BIN)/yuyan demo $(DEMO_ARGS)

# llama.cpp for tests/test_gguf.py: llama-cpp-python built from its sdist once per machine (about 3 min on
# 2 cores), its wheel cached in ~/.cache/yuyan/wheels; without a compiler the tests skip, loudly
llama-cpp: $(STAMP)
	$(BIN)/python tests/test_gguf.py

test: $(STAMP) browser fonts llama-cpp
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/pip install -q -e ".[bench]"
	for b in benchmarks/*.py; do $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) runs out build dist src/*.egg-info

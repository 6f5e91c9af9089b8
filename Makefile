# Two commands for a fresh machine (Python 3.10+):
#   make demo   set up .venv and train the microgpt preset on the names data, then print samples
#   make test   set up .venv with the test tools (and Chromium for the page test, from the system's
#               packages when run as root) and run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[names,fast]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(BIN)/pip install -q -r requirements-test.txt
	command -v chromium >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q chromium; } \
		|| echo "no chromium: the browser test of the interactive page will skip"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/arraygpt train

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info

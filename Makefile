# The commands of the README's quick start. demo, test and bench create .venv and install the
# package (with its dev extra) the first time, or when pyproject.toml changes.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test bench native

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/cam-engine demo

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: $(VENV)/.installed
	$(BIN)/cam-engine bench

# no Python environment needed: ONNX Runtime from ONNXRUNTIME_ROOT / onnxruntime_DIR, else the
# onnxruntime wheel of .venv or python3 (scripts/native/build.sh says what to set when neither)
native:
	scripts/native/build.sh build/native

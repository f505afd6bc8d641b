# `make demo` and `make test` each create .venv if missing and install everything they need.
# torch is installed first, pinned to the CPU build on this machine's disk: a plain `torch` requirement
# would otherwise pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sculpt-installed
DIGITS := samples/digits/generated

.PHONY: install test demo digits-demo lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[tvm,train,dist,dev]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -p no:cacheprovider

demo: install
	$(PY) -m samples.speaker.demo

digits-demo: install
	$(PY) samples/digits/digits_cnn.py $(DIGITS)
	$(VENV)/bin/optimize $(DIGITS)/digits_cnn.onnx --pass cleanup -o $(DIGITS)/digits_clean.onnx \
		--calibration $(DIGITS)/calibration.npz --eval $(DIGITS)/eval.npz --report $(DIGITS)/report.json
	$(VENV)/bin/optimize bench $(DIGITS)/digits_cnn.onnx $(DIGITS)/digits_clean.onnx --runtime ort --threads 1 --batch 8

lint: install
	$(VENV)/bin/ruff check optimizer passes runtimes tests samples benchmarks

clean:
	rm -rf $(VENV) $(DIGITS)

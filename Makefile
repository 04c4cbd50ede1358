# ScheduleZero Mesh — developer entry points. See README.md.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: install run test lint format bench chaos fuzz screenshots clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: install
	$(BIN)/schedulezero up --nodes 3 --handlers 1

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# make bench [BENCH_ARGS="--quick --only fires,write --profile"]: see docs/performance.md.
# The bench extra (matplotlib, for the plots) is installed here only, so make test stays lean.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

# make chaos [RUNS=100] [SEED=n] [CHAOS_ARGS=...]: the randomized toxiproxy suite, then the
# network-namespace LAN scenarios (skipped with a message where namespaces are not permitted).
RUNS ?= 100
LAN_RUNS ?= 5
chaos: install
	$(BIN)/python -m chaos --runs $(RUNS) $(if $(SEED),--seed $(SEED)) $(CHAOS_ARGS)
	$(BIN)/python -m chaos --lan --runs $(LAN_RUNS) $(if $(SEED),--seed $(SEED))

# make fuzz [FUZZ_REQUESTS=5000] [FUZZ_SECONDS=900] [SEED=n]: the long schema-driven fuzz
# campaign against a live 3-node mesh (docs/testing.md); make test runs a short one.
FUZZ_REQUESTS ?= 5000
FUZZ_SECONDS ?= 900
fuzz: install
	$(BIN)/python -m tests.fuzz_api --requests $(FUZZ_REQUESTS) --seconds $(FUZZ_SECONDS) \
		$(if $(SEED),--seed $(SEED))

# make screenshots: the dashboard's pages, taken in headless Chromium from a live 3-node mesh
# with handlers and a dozen schedules, into docs/img (shown by docs/dashboard.md and the README).
screenshots: install
	$(BIN)/python -m tests.dashboard_screenshots docs/img

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# make run   - create .venv if needed, then run the embedded default end to end (digits, CPU)
# make test  - create .venv if needed, then run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SNAKEMAKE := $(BIN)/snakemake
CORES ?= 2
# test workers (pytest-xdist, whole files per worker, in the order tests/conftest.py gives, slowest
# first, not xdist's most-tests-first): many tests wait on subprocesses, SLURM polls and
# DDP ranks, so two workers keep this 2-core machine busy
TEST_WORKERS ?= 2

.PHONY: run test lint dryrun-paper dryrun-slurm container push pull remote bench clean

# The venv is stale when pyproject.toml changed since it was built.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# A safety net behind the workflow's own guarantee (workflow/rules/handoff.smk): when Snakemake exits 0,
# the metrics table and the report of config.yaml's results_dir/reports_dir must exist; if not, fail.
CHECK_FINAL = $(BIN)/python -c 'import os, sys, yaml; \
	schema = yaml.safe_load(open("ncd/schema/config.schema.yaml"))["properties"]; \
	cfg = yaml.safe_load(open("config.yaml")) or {}; \
	d = lambda key: cfg.get(key) or schema[key]["default"]; \
	final = [d("results_dir") + "/metrics.csv", d("reports_dir") + "/index.html", d("reports_dir") + "/README.md"]; \
	missing = [f for f in final if not os.path.isfile(f)]; \
	sys.exit(f"error: snakemake exited 0 but {missing[0]} is missing; expected the whole DAG to run: run `make run` again") if missing else None'

run: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(SNAKEMAKE) --profile workflow/profiles/default --cores $(CORES)
	@$(CHECK_FINAL)
	@echo "report: $(CURDIR)/reports/index.html (and reports/README.md)"

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(SNAKEMAKE) --lint

dryrun-paper: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(SNAKEMAKE) -n --configfile workflow/experiments/paper.yaml

# the paper DAG as the cluster would run it (a stand-in answers Snakemake's `apptainer --version`
# where Apptainer is not installed; it refuses to run anything)
dryrun-slurm: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH$$(command -v apptainer >/dev/null || echo ':$(CURDIR)/containers/dryrun-bin')" \
		$(SNAKEMAKE) -n --profile slurm --configfile workflow/experiments/paper.yaml

# the Apptainer image of the GPU steps (where Apptainer is installed, e.g. a cluster's build node)
container: containers/ncd.sif
containers/ncd.sif: containers/ncd.def pyproject.toml
	@command -v apptainer >/dev/null || { echo "make container: apptainer is not installed here; build the image on a machine with Apptainer (see README, Running on a SLURM cluster)" >&2; exit 1; }
	apptainer build --force $@.tmp containers/ncd.def && mv $@.tmp $@

# share results/ through DVC (README, "Get the results without training")
push: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m ncd.artifacts push
pull: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m ncd.artifacts pull
remote: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m ncd.artifacts remote "$(URL)"

bench: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/simclr_throughput.py

clean:
	rm -rf results reports/index.html reports/README.md reports/figures .snakemake

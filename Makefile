# make run   set-up + CC on the embedded digits data set (a couple of minutes on a laptop CPU)
# make test  set-up + the test suite (slow tests: make test-slow)
# make lint  ruff check + ruff format --check (CI runs it before the tests)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: setup chromium emoji-font run test test-slow lint clean device-carry

setup: $(STAMP) chromium emoji-font

# Headless Chromium for the report's browser test (tests/cluster/test_report.py): Debian's package, once.
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -q && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q chromium) || echo "chromium could not be installed: the browser test will be skipped"

# Noto Color Emoji, the source of the held-out emoji-colour folder (benchmarks/make_heldout_folders.py):
# Debian's package, once.
emoji-font:
	@test -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf || (apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q fonts-noto-color-emoji) || \
		echo "fonts-noto-color-emoji could not be installed: the emoji-colour folder test will be skipped"

# The versions of constraints.txt: what CI and the recorded results ran on (pyproject.toml keeps ranges).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "make setup: Python 3.11 or \
	newer is needed (constraints.txt pins numpy, scipy, scikit-learn and kornia releases that require it); \
	$(VENV) has $$($(BIN)/python --version). Remove $(VENV) and run: make setup PYTHON=python3.11"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

run: $(STAMP)
	$(BIN)/clusterlab fit --config experiments/cc_digits.yaml

# One test file per worker, one per core; one thread per process, so that the workers and the
# processes the tests launch do not oversubscribe the cores.
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n auto --dist loadfile --durations=5

test-slow: setup
	$(BIN)/python -m pytest -m slow

lint: $(STAMP)
	$(BIN)/ruff check clusterlab tests benchmarks
	$(BIN)/ruff format --check clusterlab tests benchmarks

# What the GPU machine lacks (wheels, Fashion-MNIST's .deb) for benchmarks/device/run.sh, into the
# ignored benchmarks/device/carry/ (docs/multi-gpu.md, "GPU").
device-carry:
	bash benchmarks/device/fill_carry.sh

clean:
	rm -rf $(VENV) runs .pytest_cache

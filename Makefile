# Two commands on a fresh clone: `make demo` (the main job) and `make test` (the test suite).
# Both create the virtual environment and install the pinned versions first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo
# pytest-xdist workers for `make test`: the suite is mostly single-threaded, so two workers use two cores.
TEST_WORKERS ?= 2

.PHONY: install demo test bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[cpu,test]"
	touch $@

install: $(BIN)/.installed

# The main job on embedded defaults: synthesise a multi-scale dataset, train ScaleMatch briefly on CPU,
# print its metrics at x0.5 / x1 / x2, export it, start Label Studio (own venv, SQLite) and launch the
# app; the URLs are printed. DEMO_FLAGS=--no-app stops after the metrics and the export.
demo: install
	$(BIN)/scaleseg demo --out $(DEMO) $(DEMO_FLAGS)

# The browser test drives Debian's chromium; it is installed here when possible (root + apt) and the
# test skips with that reason otherwise. Label Studio installs itself into .venv-labelstudio on first use.
test: install
	@[ -x /usr/bin/chromium ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || true
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: install
	$(BIN)/python bench/train_speed.py
	$(BIN)/python bench/label_efficiency.py
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/decoder_cost.py
	$(BIN)/python bench/serve_load.py

clean:
	rm -rf $(VENV) $(DEMO)

# Two commands on a fresh clone: `make demo` (the main job) and `make test` (the test suite).
# Both create the virtual environment and install the pinned versions first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo

.PHONY: install demo test bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

install: $(BIN)/.installed

# The training slice end to end on embedded defaults: synthesise a multi-scale dataset, train
# ScaleMatch briefly on CPU, evaluate it at input scales x0.5 / x1 / x2 and print the metrics table.
demo: install
	$(BIN)/scaleseg data synth $(DEMO)/data --classes 5 --n-labeled 16 --n-unlabeled 160 --n-val 40 --size 128 --force
	$(BIN)/scaleseg train $(DEMO)/data --method scalematch --backbone resnet18 --crop-size 96 --batch-size 4 \
		--max-iters 240 --eval-every 80 --lr 0.01 --warmup-epochs 2 --out $(DEMO)/run
	$(BIN)/scaleseg eval $(DEMO)/run/best.pt $(DEMO)/data --json $(DEMO)/eval.json

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/train_speed.py
	$(BIN)/python bench/label_efficiency.py

clean:
	rm -rf $(VENV) $(DEMO)

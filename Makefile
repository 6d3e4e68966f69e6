# Quick start: `make demo` (sets itself up, runs the whole chain on the embedded model), `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := runs/demo
PROMPT ?= a green triangle left of a yellow circle

.PHONY: install demo test mini-model clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0   # first, so the next line does not pull a CUDA build
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/bitflux quantize --workdir $(DEMO)
	$(BIN)/bitflux pack --workdir $(DEMO)
	$(BIN)/bitflux generate "$(PROMPT)" --workdir $(DEMO) --out $(DEMO)/demo.png
	$(BIN)/bitflux eval --workdir $(DEMO)
	@echo "image written to $(DEMO)/demo.png; contact sheet of the scored prompts in $(DEMO)/eval/"

# Retrain the embedded mini model as the committed one was made (72 min on 2 CPU cores): VAE 1,000
# steps, flow matching 20,000, guidance distillation 2,000 (49 min); then continued from those
# weights, flow matching 8,000 more steps on a new schedule and guidance distillation again (23 min);
# writes bitflux_cli/assets/mini/.
MINI_BASE = runs/mini-model/base
mini-model: $(STAMP)
	$(BIN)/python -m bitflux_cli.miniworld.train --threads 2 --out $(MINI_BASE)
	$(BIN)/python -m bitflux_cli.miniworld.train --threads 2 --init $(MINI_BASE) --vae-steps 0 --steps 8000

# glibc hands every freed block over 32 MB back to the kernel and faults it in again on the next allocation: at
# FLUX's full width (the stand-in tests) that was a third of their time. Kept in the heap, the stand-in chain
# took 86 s instead of 121 s and the suite 8:01 instead of 8:39 (one fresh-clone run each; this machine's speed
# varies by the hour, the next fresh clone took 8:59), for 10.6 GB peak instead of 9.1 GB.
TEST_MALLOC := MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824

test: $(STAMP)
	$(TEST_MALLOC) $(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache

# The front door. Every target is one line in README.md.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/default.yaml
ARGS   ?=
CKPT   ?=
SPLIT  ?= test
BEAM   ?=
RUN    ?=
LAST   ?=
UPTO   ?=
RESUME ?=
NPROC  ?=
TORCHRUN ?=
SWEEP  ?= configs/sweep.yaml
PROBE  ?= configs/probe.yaml

.PHONY: install test lint train translate evaluate average attention probe plot sweep bench \
	bench-decode clean

install:  ## virtual environment in .venv with torch (CPU build) and the project
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'

test:  ## the test suite (CPU, no network)
	$(BIN)/python -m pytest

lint:
	$(BIN)/ruff check transformer scripts tests

# NPROC=N: N processes under torchrun (one per GPU); TORCHRUN="--nnodes=2 ...": several machines.
train:  ## make train [CONFIG=configs/x.yaml] [ARGS="model.n_heads=8"] [RESUME=runs/x] [NPROC=N]
	$(BIN)/transformer-train --config $(CONFIG) $(if $(RESUME),--resume $(RESUME)) \
		$(if $(NPROC),--nproc $(NPROC)) $(if $(TORCHRUN),--torchrun "$(TORCHRUN)") $(ARGS)

# The sentence reaches the program as typed: through the environment, so that quotes
# survive, and unexpanded ($(value)), so that make does not eat "$1" or "$(HOME)" in it.
export SENTENCE_TEXT = $(value SENTENCE)

translate:  ## make translate SENTENCE="..." [CKPT=runs/x/best.pt]; without SENTENCE: stdin
	@$(BIN)/transformer-translate $(if $(CKPT),--ckpt $(CKPT)) $(if $(BEAM),--beam $(BEAM)) \
		$(if $(value SENTENCE),-- "$$SENTENCE_TEXT")

# CKPT="a.pt b.pt ..." (one run per seed, say) and SPLIT="test valid ...": each, then the spread.
evaluate:  ## make evaluate [CKPT=runs/x/best.pt] [SPLIT=test|valid] [ARGS="data.path=..."]
	@$(BIN)/transformer-evaluate $(if $(CKPT),--ckpt $(CKPT)) $(if $(BEAM),--beam $(BEAM)) \
		--split $(SPLIT) $(ARGS)

average:  ## make average RUN=runs/x [LAST=10] [UPTO=step]: average.pt from the run's step-*.pt
	@$(BIN)/transformer-average $(RUN) $(if $(LAST),--last $(LAST)) $(if $(UPTO),--upto $(UPTO))

attention:  ## make attention SENTENCE="..." [CKPT=runs/x/best.pt]: heatmaps of all attentions
	@$(BIN)/transformer-attention $(if $(CKPT),--ckpt $(CKPT)) $(if $(BEAM),--beam $(BEAM)) \
		-- "$$SENTENCE_TEXT"

probe:  ## make probe [CKPT=runs/x/best.pt] [PROBE=configs/probe.yaml]: pronoun -> noun attention
	@$(BIN)/transformer-probe $(if $(CKPT),--ckpt $(CKPT)) $(if $(BEAM),--beam $(BEAM)) --file $(PROBE)

plot:  ## make plot RUN=runs/x [X=epochs]: loss, BLEU, lr against steps (or epochs); RUN="runs/a runs/b": compare.png
	@$(BIN)/transformer-plot $(RUN) $(if $(X),--x $(X))

sweep:  ## make sweep [SWEEP=configs/sweep.yaml] [ARGS="data.path=..."] [JOBS=N]: train a grid, tabulate, plot
	$(BIN)/transformer-sweep $(SWEEP) $(ARGS) $(if $(JOBS),--jobs $(JOBS))

bench:  ## training speed against torch.nn.Transformer, FLOP/s, memory; ARGS="--quick --device cuda"
	$(BIN)/python scripts/bench_train.py $(ARGS)

bench-decode:  ## cached vs uncached decoding; with CKPT=..., the time to translate test, beam 5
	$(BIN)/python scripts/bench_decode.py $(if $(CKPT),--ckpt $(CKPT) --beam $(or $(BEAM),5)) $(ARGS)

clean:  ## remove runs and caches (keeps data/ downloads)
	rm -rf runs .pytest_cache .ruff_cache

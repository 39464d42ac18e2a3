# The README's contract: `make demo` and `make test` work on a fresh machine (they create .venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN    ?= runs/tiny
# 2 CPU cores: fp32 everywhere, one intra-op thread pool per process.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast lint clean

# torch is pinned and installed first: an unpinned torch resolves to a multi-GB CUDA build.
# pip byte-compiles every installed file on one core (~25 s of a ~52 s install here); compileall does
# the same on every core (-j 0) afterwards: ~43 s in all. Its exit status is ignored: torch ships a
# test file in Python 3.12 syntax (torch/testing/_internal/py312_intrinsics.py), which pip skips too.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-compile torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check --no-compile -e '.[dev]'
	$(BIN)/python -m compileall -q -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" > /dev/null 2>&1 || true
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vargpt pipeline --preset tiny --out $(RUN)
	@echo "--- a held-out image, a question, then a drawing request ($(RUN)/final) ---"
	$(BIN)/vargpt chat --model $(RUN)/final --image $(RUN)/data/images/test/000001.png "What colour is the shape?"
	$(BIN)/vargpt chat --model $(RUN)/final --out $(RUN)/chat "Please draw a large red circle."
	@echo "report: $(RUN)/report.html   metrics: $(RUN)/metrics.json"

test: $(STAMP)
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check vargpt tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache

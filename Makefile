# The two commands of the README: `make run` (main job) and `make test`.
# Both create the virtual environment .venv on first use and install the project into it.
PYTHON ?= python3
VENV ?= .venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

.PHONY: run test bench
run: $(VENV)/.installed
	$(VENV)/bin/mlsa4rec demo

test: $(VENV)/.installed
	$(VENV)/bin/pytest -q

bench: $(VENV)/.installed
	$(VENV)/bin/python bench/train_speed.py
	$(VENV)/bin/python bench/step_speed.py
	$(VENV)/bin/python bench/stream_throughput.py
	$(VENV)/bin/python bench/model_updates.py

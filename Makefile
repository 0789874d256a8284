# The two commands of the README: `make run` (main job) and `make test`.
# Both create the virtual environment .venv on first use and install the project into it.
PYTHON ?= python3
VENV ?= .venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

.PHONY: run test test-under-load bench chromium
run: $(VENV)/.installed
	$(VENV)/bin/mlsa4rec demo

# The report test opens the HTML report in headless Chromium; where it is missing and Debian's
# apt-get can install it, do so (best effort: the test says "skipped" if it is still missing).
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; } || true

# Two test files at a time (-n 2): the end-to-end tests spend most of their time waiting on
# brokers, groups and subprocesses, so two of them share the 2 cores; each pytest process has
# its own broker. What takes the time is printed at the end (--durations).
test: $(VENV)/.installed chromium
	$(VENV)/bin/pytest -q -n 2 --dist loadfile --durations=15

# The end-to-end tests with two busy processes and 2 GB held beside them (docs/RELIABILITY.md).
test-under-load: $(VENV)/.installed
	$(VENV)/bin/python tests/run_under_load.py

bench: $(VENV)/.installed
	$(VENV)/bin/python bench/train_speed.py
	$(VENV)/bin/python bench/step_speed.py
	$(VENV)/bin/python bench/stream_throughput.py
	$(VENV)/bin/python bench/model_updates.py
	$(VENV)/bin/python bench/query_latency.py

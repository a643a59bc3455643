# The two entry points the README documents. Each is self-contained: it creates or reuses .venv.
.PHONY: setup bench test

setup:
	bash scripts/setup.sh

bench: setup
	.venv/bin/moekit bench

test: setup
	.venv/bin/python -m pytest -q

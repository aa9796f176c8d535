# Thin wrappers over the commands in README.md.
PY := .venv/bin/python

.PHONY: setup test test-fast lint proto proto-check bench
setup:
	python3 -m venv .venv && $(PY) -m pip install -e '.[dev]'
test:
	bash scripts/test.sh
test-fast:
	bash scripts/test.sh -m "not slow"
lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && \
	$(PY) -m mypy -p rdbroker_common -p rdbroker_rdp -p rdbroker_broker -p rdbroker_proxy \
	  -p rdbroker_health -p rdbroker_agent -p rdbroker_cli && .venv/bin/lint-imports
proto:
	$(PY) scripts/gen_protos.py
proto-check:
	$(PY) scripts/gen_protos.py --check
bench:
	$(PY) bench/route_bench.py && $(PY) bench/proxy_bench.py

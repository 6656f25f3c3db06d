.PHONY: test lint bench

test:
	python -m pytest

lint:
	ruff check . && ruff format --check .

bench:
	python -m bench kernels

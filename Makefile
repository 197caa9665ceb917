.PHONY: dev test bench bench-quick

dev:          ## the server with its embedded Redis + PostgreSQL and demo members
	./scripts/dev

test:         ## lint, types, stub check, buf lint, tests (what CI runs)
	./scripts/test

bench:        ## pointauth's speed on this machine: table on stdout, figures in bench.json
	uv run python -m loadtest.bench --json bench.json

bench-quick:  ## one step per scenario (~30 s)
	uv run python -m loadtest.bench --quick

.PHONY: dev test bench bench-quick proto-release

dev:          ## the server with its embedded Redis + PostgreSQL and demo members
	./scripts/dev

test:         ## lint, types, stub check, buf lint + breaking, tests (what CI runs)
	./scripts/test

bench:        ## pointauth's speed on this machine: table on stdout, figures in bench.json
	uv run python -m loadtest.bench --json bench.json

bench-quick:  ## one short run of each step (~40 s)
	uv run python -m loadtest.bench --quick

proto-release: ## VERSION=v0.2.0: record HEAD's protos as a release; buf breaking checks against it
	@test -n "$(VERSION)" || { echo "usage: make proto-release VERSION=v0.2.0" >&2; exit 2; }
	@# From HEAD, not the working tree: a release is what was committed, edits in progress are not.
	tmp=$$(mktemp -d) && git archive HEAD buf.yaml proto | tar -x -C "$$tmp" && \
	  uv run buf build "$$tmp" -o proto/releases/$(VERSION).binpb; status=$$?; rm -rf "$$tmp"; exit $$status

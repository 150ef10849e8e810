# Switchyard: `make run` starts the demo, `make test` runs every check CI runs.
# Both install their system prerequisites first (Debian; root or sudo).

CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test deps test-deps build fmt lint deploy-demo

deps:
	@command -v cmake >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq cmake; }
	@command -v cc >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq build-essential; }

# promtool (Debian package prometheus) checks the metrics output in the tests.
test-deps: deps
	@command -v curl >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq curl; }
	@command -v promtool >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }

build: deps
	$(CARGO) build --release --bin switchyard

run: build
	./target/release/switchyard demo

fmt:
	$(CARGO) fmt --all -- --check

lint: deps
	$(CARGO) clippy --all-targets -- -D warnings

test: test-deps fmt lint
	$(CARGO) test --all-targets

# The canary scenario against the demo, plotted to docs/canary.png (needs python3; installs
# matplotlib from PyPI when missing).
deploy-demo: build
	@python3 -c "import matplotlib" 2>/dev/null || python3 -m pip install --quiet matplotlib
	python3 deploy/canary_demo.py --binary target/release/switchyard --out docs/canary.png

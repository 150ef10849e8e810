# Switchyard: `make run` starts the demo, `make test` runs every check CI runs.
# Both install their system prerequisites first (Debian; root or sudo).

CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test deps test-deps build deb fmt lint deploy-demo upgrade-stress nginx-dep bench bench-deps bench-callgrind

deps:
	@command -v cmake >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq cmake; }
	@command -v cc >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq build-essential; }
	@# The etcd client's gRPC definitions are compiled at build time.
	@command -v protoc >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq protobuf-compiler; }

# promtool (Debian package prometheus) checks the metrics output in the tests; h2load (Debian
# package nghttp2-client) is the HTTP/2 load of the deploy suite under TLS; openssl makes and
# reads the TLS tests' certificates; nghttpd (nghttp2-server), Python's http.server and grpcio
# are the HTTPS, HTTP/2 and gRPC backends of the upstream tests (grpcio from PyPI, or Debian's
# python3-grpcio where pip cannot install into the system's Python); chromium and chromedriver
# (chromium-driver) render the status page in the tests. The deploy assets' tests
# (tests/integration/deploy_assets.rs) run prometheus and promtool, systemd-analyze (systemd)
# on the unit, and build the .deb (dpkg-deb, objdump from binutils for its libc6 dependency)
# and install it (adduser for its postinst, logrotate to read its snippet). etcd and etcdctl
# (etcd-server, etcd-client) are the shared state store of the several-instances tests.
test-deps: deps
	@command -v etcd >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq etcd-server; }
	@command -v etcdctl >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq etcd-client; }
	@command -v curl >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq curl; }
	@command -v promtool >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }
	@command -v h2load >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq nghttp2-client; }
	@command -v openssl >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq openssl; }
	@command -v nghttpd >/dev/null || [ -x /usr/sbin/nghttpd ] || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq nghttp2-server; }
	@command -v python3 >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3; }
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }
	@command -v chromedriver >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium-driver; }
	@python3 -c "import grpc" 2>/dev/null || python3 -m pip install --quiet grpcio 2>/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-grpcio; }
	@command -v systemd-analyze >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq systemd; }
	@command -v dpkg-deb >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dpkg; }
	@command -v objdump >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq binutils; }
	@command -v logrotate >/dev/null || [ -x /usr/sbin/logrotate ] || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq logrotate; }
	@command -v adduser >/dev/null || [ -x /usr/sbin/adduser ] || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq adduser; }

build: deps
	$(CARGO) build --release --bin switchyard

# The Debian package of the release build, in target/debian/ (deploy/deb/build.sh; what it
# installs where: docs/operations.md).
deb: build
	deploy/deb/build.sh target/release/switchyard $$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml) target/debian

run: build
	./target/release/switchyard demo

fmt:
	$(CARGO) fmt --all -- --check

lint: deps
	$(CARGO) clippy --all-targets -- -D warnings

test: test-deps fmt lint
	$(CARGO) test --all-targets

# Against the demo under load (deploy/canary_demo.py): the canary by hand, plotted to
# docs/canary.png, and an automated rollout that rolls back on its own when green starts
# failing, plotted to docs/rollback.png (needs python3; installs matplotlib from PyPI when missing).
deploy-demo: build
	@python3 -c "import matplotlib" 2>/dev/null || python3 -m pip install --quiet matplotlib
	python3 deploy/canary_demo.py --binary target/release/switchyard --out docs/canary.png
	python3 deploy/canary_demo.py --scenario rollback --binary target/release/switchyard --out docs/rollback.png

# 40 binary upgrades in a row under load, with two busy loops on the CPUs, nginx as the
# backend (deploy/upgrade_stress.py): lists every failed request, exits 1 if there is one.
upgrade-stress: build nginx-dep
	PATH="$$PATH:/usr/sbin:/sbin" python3 deploy/upgrade_stress.py --binary target/release/switchyard

# Switchyard against nginx, HAProxy and two bare Pingora references (the framework floor,
# crates/switchyard-bench-refs) on this machine (tests/bench/bench.py): results between
# the markers of docs/benchmarks.md and in docs/benchmarks.png. BENCH_DURATION (seconds per
# run, default 5) and BENCH_ROUNDS (default 3) tune it. perf is optional (syscall counts).
# The TLS and HTTP/2 scenarios need openssl (certificates), cc (deps: wrk's TLS shim)
# and h2load (nghttp2-client).
# fixed-rate-1t needs oha (an open-loop load generator, not packaged in Debian), built from
# crates.io by `cargo install` into ~/.cargo/bin (15 CPU-minutes: 42 minutes here on a
# 2-CPU machine shared with four parallel builds),
# skipped when that version is already there.
OHA_VERSION := 1.16.0
OHA := $(or $(shell command -v oha),$${CARGO_HOME:-$$HOME/.cargo}/bin/oha)
nginx-dep:
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { $(SUDO) apt-get update -qq && { $(SUDO) apt-get install -y -qq nginx-light || $(SUDO) apt-get install -y -qq nginx; }; }

bench-deps: nginx-dep
	@command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq haproxy; }
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk; }
	@command -v h2load >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq nghttp2-client; }
	@command -v openssl >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq openssl; }
	@$(OHA) --version 2>/dev/null | grep -qx "oha $(OHA_VERSION)" || $(CARGO) install --locked oha --version $(OHA_VERSION)
	@command -v perf >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq linux-perf; } || echo "perf not available: syscall counts will be skipped"
	@python3 -c "import matplotlib" 2>/dev/null || python3 -m pip install --quiet matplotlib

# Instructions per request (callgrind, 1 000 vs 4 000 keep-alive requests) for Switchyard and
# the two bare Pingora references, and the functions that cost Switchyard most over the bare
# proxy (tests/bench/callgrind.py): for comparing builds on a host too busy for CPU times.
bench-callgrind: deps bench-deps
	@command -v valgrind >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq valgrind; }
	$(CARGO) build --release --bin switchyard
	$(CARGO) build --release -p switchyard-bench-refs
	PATH="$$PATH:/usr/sbin:/sbin" python3 tests/bench/callgrind.py --binary target/release/switchyard \
		--pingora-proxy target/release/bare-pingora-proxy --pingora-core target/release/bare-pingora-core --top 30

# The release binary with profile-guided optimisation, in target/pgo/switchyard
# (tests/bench/pgo.sh): an instrumented build, a short training pass of the bench scenarios,
# llvm-profdata-N (Debian's llvm-N, N = rustc's LLVM major, installed when missing), a build
# with the profile. Its target dirs are under target/pgo; target/release is left alone.
# Not used by run or bench: docs/benchmarks.md ("Profile-guided optimisation") says why.
.PHONY: pgo
pgo: deps bench-deps
	tests/bench/pgo.sh

bench: deps bench-deps
	$(CARGO) build --release --bin switchyard --features alloc-count
	cp target/release/switchyard target/release/switchyard-alloc-count
	$(CARGO) build --release --bin switchyard
	$(CARGO) build --release -p switchyard-bench-refs
	PATH="$$PATH:/usr/sbin:/sbin" python3 tests/bench/bench.py --binary target/release/switchyard \
		--pingora-proxy target/release/bare-pingora-proxy --pingora-core target/release/bare-pingora-core

#!/bin/sh
# `make pgo`: the release binary built with profile-guided optimisation (issue 16), in
# target/pgo/switchyard. An instrumented build runs a short pass of the bench's scenarios
# (tests/bench/bench.py, Switchyard only: keep-alive, with an access log, new connections,
# 16 KiB bodies, full and resumed TLS handshakes, TLS keep-alive, HTTP/2), llvm-profdata merges
# the profile it writes at exit, and a second build uses it. Both builds have their own
# target dirs under target/pgo, so target/release (make run, make bench) is never rebuilt for
# it. llvm-profdata must be of rustc's LLVM major version: it comes from Debian's llvm-N.
# PGO_DURATION (seconds per training run, default 2) and PGO_BASE_PORT (first of the bench's
# 113 ports, default 20200: clear of a `make bench` running at the same time) tune it.
set -eu
cd "$(dirname "$0")/../.."
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
OUT=target/pgo
PROFRAW="$PWD/$OUT/profraw"

major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9][0-9]*\)\..*/\1/p')
host=$(rustc -vV | sed -n 's/^host: //p')
if [ -z "$major" ] || [ -z "$host" ]; then
    echo "pgo: cannot read the LLVM version and host from 'rustc -vV'" >&2
    exit 1
fi
profdata="llvm-profdata-$major"
if ! command -v "$profdata" >/dev/null; then
    # The profile format follows LLVM's major version: another major's tool cannot read it.
    if ! apt-cache show "llvm-$major" >/dev/null 2>&1; then
        $SUDO apt-get update -qq
    fi
    if ! apt-cache show "llvm-$major" >/dev/null 2>&1; then
        echo "pgo: rustc uses LLVM $major and Debian has no llvm-$major package (for" \
            "$profdata); install llvm-profdata of LLVM $major by hand" >&2
        exit 1
    fi
    $SUDO apt-get install -y -qq "llvm-$major"
fi

echo "pgo: instrumented build (LLVM $major, $host)"
# --target: RUSTFLAGS then apply to the binary's crates only, not to build scripts and proc
# macros, which would write profiles of their own while building.
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$PROFRAW" \
    cargo build --release --bin switchyard --target "$host" --target-dir "$OUT/instrumented"

echo "pgo: training run (tests/bench/bench.py, Switchyard only)"
rm -rf "$PROFRAW"
mkdir -p "$PROFRAW"
# The profile is written when the process exits: bench.py stops it with SIGTERM, and the drain
# ends it with exit(0). Exit status 1 is a failed request (the instrumented build is slower):
# the profile is still good; 2 is a run that could not happen.
rc=0
PATH="$PATH:/usr/sbin:/sbin" python3 tests/bench/bench.py \
    --binary "$OUT/instrumented/$host/release/switchyard" --systems switchyard \
    --scenarios a,r,c,d,l,n,o,q --duration "${PGO_DURATION:-2}" --rounds 1 --no-docs \
    --no-perf --base-port "${PGO_BASE_PORT:-20200}" || rc=$?
if [ "$rc" -gt 1 ]; then
    echo "pgo: the training run failed (bench.py exit status $rc)" >&2
    exit 1
fi
if ! ls "$PROFRAW"/*.profraw >/dev/null 2>&1; then
    echo "pgo: the instrumented binary wrote no profile to $PROFRAW (did it exit cleanly?)" >&2
    exit 1
fi
"$profdata" merge -o "$OUT/merged.profdata" "$PROFRAW"
# The profile's hash in its name: cargo rebuilds when RUSTFLAGS change, not when a file they
# name does, so a new profile has to be a new flag.
sum=$(sha256sum "$OUT/merged.profdata" | cut -c1-16)
rm -f "$OUT"/switchyard-*.profdata
mv "$OUT/merged.profdata" "$OUT/switchyard-$sum.profdata"

echo "pgo: optimised build"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PWD/$OUT/switchyard-$sum.profdata" \
    cargo build --release --bin switchyard --target "$host" --target-dir "$OUT/optimised"
cp "$OUT/optimised/$host/release/switchyard" "$OUT/switchyard"
echo "pgo: $OUT/switchyard"

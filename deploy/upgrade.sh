#!/usr/bin/env bash
# Zero-downtime binary upgrade of a running switchyard, for machines without systemd
# (systemd users: `systemctl reload switchyard` runs this same script).
#
#   deploy/upgrade.sh CONFIG [OLD_PID] [BINARY]
#
# OLD_PID may be left out (or given as -) when the config sets server.pid_file: the pid is
# read from that file, which the running instance wrote once it served. The systemd unit
# passes $MAINPID.
#
# 1. starts BINARY (default: switchyard on PATH) with `run --config CONFIG --upgrade`;
# 2. waits until it listens on server.upgrade_socket for the sockets;
# 3. sends SIGQUIT to OLD_PID, which hands over proxy, admin and metrics sockets, answers
#    with `Connection: close` from then on, and exits once its requests are done;
# 4. waits for OLD_PID to exit and prints the new PID.
# Runtime state (splits, drains, added backends) carries over through `state_file`.
set -euo pipefail

usage="usage: upgrade.sh CONFIG [OLD_PID] [BINARY]"
config=${1:?$usage}
# The second argument is the PID when it is a number (or - for none), else already BINARY.
case ${2:-} in
    '' | -) old_pid= ; binary=${3:-switchyard} ;;
    *[!0-9]*) old_pid= ; binary=$2 ;;
    *) old_pid=$2 ; binary=${3:-switchyard} ;;
esac
# The new process logs where this script's stderr goes (the journal under systemd), or to
# SWITCHYARD_UPGRADE_LOG when set.
log=${SWITCHYARD_UPGRADE_LOG:-}

# Running and not a zombie (a parent that has not reaped it yet).
alive() {
    local state
    state=$(sed -n 's/^.*) \(.\).*$/\1/p' "/proc/$1/stat" 2>/dev/null || true)
    [ -n "$state" ] && [ "$state" != Z ]
}

"$binary" check --config "$config" >/dev/null
# The first `KEY: value` of the config, without comment or quotes (the config passed `check`).
config_value() {
    sed -n "s/^[[:space:]]*$1:[[:space:]]*//p" "$config" | head -n 1 | sed 's/[[:space:]]*#.*$//' | tr -d "\"'"
}
if [ -z "$old_pid" ]; then
    pid_file=$(config_value pid_file)
    [ -n "$pid_file" ] || { echo "upgrade: no OLD_PID given and $config sets no server.pid_file; $usage" >&2; exit 2; }
    old_pid=$(tr -d '[:space:]' <"$pid_file" 2>/dev/null || true)
    case $old_pid in
        '' | *[!0-9]*) echo "upgrade: $pid_file (server.pid_file) holds no pid; is switchyard running with $config?" >&2; exit 1 ;;
    esac
    # A process killed without its exit leaves its pid behind, and the pid may have been
    # reused since: SIGQUIT goes only to a switchyard.
    case $(readlink "/proc/$old_pid/exe" 2>/dev/null || true) in
        *switchyard*) ;;
        *) echo "upgrade: $pid_file names pid $old_pid, which is not a running switchyard (a stale pid file?); give OLD_PID" >&2; exit 1 ;;
    esac
fi
socket=$(config_value upgrade_socket)
socket=${socket:-/run/switchyard/upgrade.sock}
# The old process accepts for 5 s after SIGQUIT, then drains for at most grace_period (the
# config passed `check`, so the value is one of <n>ms, <n>s, <n>m, <n>h).
grace=$(config_value grace_period)
grace=${grace:-30s}
case $grace in
    *ms) grace_s=$(( (${grace%ms} + 999) / 1000 )) ;;
    *s) grace_s=${grace%s} ;;
    *m) grace_s=$(( ${grace%m} * 60 )) ;;
    *h) grace_s=$(( ${grace%h} * 3600 )) ;;
    *) grace_s=30 ;;
esac
wait_s=$(( 5 + grace_s + 10 ))
alive "$old_pid" || { echo "upgrade: no running process $old_pid" >&2; exit 1; }

rm -f "$socket"
if [ -n "$log" ]; then
    nohup "$binary" run --config "$config" --upgrade >>"$log" 2>&1 &
else
    nohup "$binary" run --config "$config" --upgrade </dev/null &
fi
new_pid=$!

# The new process waits about 5 s for the sockets; it creates the socket file when ready.
for _ in $(seq 100); do
    [ -S "$socket" ] && break
    alive "$new_pid" || { echo "upgrade: new process $new_pid exited" >&2; exit 1; }
    sleep 0.05
done
[ -S "$socket" ] || { echo "upgrade: $socket never appeared" >&2; kill "$new_pid"; exit 1; }

kill -QUIT "$old_pid"
for _ in $(seq $(( wait_s * 10 ))); do
    alive "$old_pid" || break
    sleep 0.1
done
if alive "$old_pid"; then
    echo "upgrade: old process $old_pid still running after $wait_s s (grace_period $grace)" >&2
    exit 1
fi
alive "$new_pid" || { echo "upgrade: new process $new_pid died" >&2; exit 1; }
echo "new pid $new_pid"

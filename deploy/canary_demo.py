#!/usr/bin/env python3
"""Canary deploys, shown: runs `switchyard demo`, sends load from 16 clients (half keep-alive,
half a new connection per request) and plots requests per version and errors over time.

- `--scenario canary`: shifts the split 100/0 -> 99/1 -> 90/10 -> 50/50 -> 0/100 through the
  admin API by hand. Exits 1 if any request failed.
- `--scenario rollback`: starts an automated rollout to green (10, 25, 50, 100%), makes green
  answer 500 to 30% of its requests (the demo backend's /chaos) once it has 50%, and measures
  how long the rollout takes to give blue everything back and how many failed requests green
  served meanwhile. Exits 1 if it did not roll back on its own or blue failed a request.

    python3 deploy/canary_demo.py --binary target/release/switchyard --out docs/canary.png
    python3 deploy/canary_demo.py --scenario rollback --out docs/rollback.png

Only 127.0.0.1 is contacted.
"""
import argparse
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time

LB = ("127.0.0.1", 8080)
ADMIN = ("127.0.0.1", 9000)
GREEN = ("127.0.0.1", 9002)
STEPS = [(100, 0), (99, 1), (90, 10), (50, 50), (0, 100)]
CLIENTS = 16
PACE = 0.005
# Short enough to watch, long enough for 2 windows a step at this load.
ROLLOUT = {
    "to": "green",
    "steps": [10, 25, 50, 100],
    "step_interval": "4s",
    "analysis": {"interval": "1s", "min_requests": 20, "max_error_rate": 0.01},
    "checks": [{"url": "http://127.0.0.1:9002/version", "expect_status": 200}],
}
CHAOS = "/chaos?errors=30"


def wait_for_port(address, limit=30.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            socket.create_connection(address, timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {address[0]}:{address[1]}")


def call(address, method, path, body=None, expect=200):
    """One request; the decoded JSON answer (or text), or exit naming what was refused."""
    conn = http.client.HTTPConnection(*address, timeout=5)
    conn.request(method, path, None if body is None else json.dumps(body))
    response = conn.getresponse()
    text = response.read().decode(errors="replace")
    conn.close()
    if response.status != expect:
        raise SystemExit(f"{method} {path} refused: {response.status} {text}")
    try:
        return json.loads(text)
    except ValueError:
        return text


def put_split(blue, green):
    call(ADMIN, "PUT", "/api/v1/routes/web/split", {"blue": blue, "green": green})


def client(keep_alive, stop, samples):
    conn = None
    while not stop.is_set():
        try:
            if conn is None:
                conn = http.client.HTTPConnection(*LB, timeout=5)
            headers = {} if keep_alive else {"Connection": "close"}
            conn.request("GET", "/", headers=headers)
            response = conn.getresponse()
            body = response.read().decode(errors="replace")
            if not keep_alive or response.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = None
            upstream = response.getheader("X-Switchyard-Upstream") or (
                "green" if "green" in body else "blue"
            )
            outcome = upstream if 200 <= response.status < 300 else "error"
        except (OSError, http.client.HTTPException):
            outcome, upstream = "error", None
            if conn is not None:
                conn.close()
            conn = None
        samples.append((time.monotonic(), outcome, upstream))
        time.sleep(PACE)


def plot(samples, marks, started, out, title):
    """Requests/s per version and failed requests/s; `marks`: (time, label, colour) lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.25
    end = max(t for t, *_ in samples)
    bins = int((end - started) / width) + 1
    series = {k: [0] * bins for k in ("blue", "green", "error")}
    for t, outcome, _ in samples:
        series[outcome][int((t - started) / width)] += 1
    # Each bin drawn at its middle, so a line marks the same instant as the curve.
    xs = [(i + 0.5) * width for i in range(bins)]
    rate = lambda k: [n / width for n in series[k]]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.plot(xs, rate("blue"), color="#1f5fbf", label="blue (v1) requests/s")
    ax.plot(xs, rate("green"), color="#2e9e4f", label="green (v2) requests/s")
    ax.plot(xs, rate("error"), color="#d62728", linewidth=2, label="failed requests/s")
    top = ax.get_ylim()[1]
    for i, (t, label, colour) in enumerate(marks):
        ax.axvline(t - started, color=colour, linestyle=":", linewidth=1.2)
        # Staggered, so that labels of lines close together do not overlap.
        y = top * (0.97 - 0.07 * (i % 3 if colour == "grey" else 3 + i % 2))
        ax.text(t - started + 0.05, y, label, fontsize=8, va="top", color=colour)
    ax.set_title(title)
    ax.set_xlabel("seconds")
    ax.set_ylabel("requests per second")
    ax.legend(loc="center left")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def start_demo(binary):
    demo = subprocess.Popen([binary, "demo"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(LB)
    wait_for_port(ADMIN)
    wait_for_port(GREEN)
    return demo


def stop_demo(demo):
    demo.send_signal(signal.SIGTERM)
    try:
        demo.wait(timeout=15)
    except subprocess.TimeoutExpired:
        demo.kill()


def start_load(samples, stop):
    threads = [
        threading.Thread(target=client, args=(i % 2 == 0, stop, samples), daemon=True)
        for i in range(CLIENTS)
    ]
    for t in threads:
        t.start()
    return threads


def canary(args):
    demo = start_demo(args.binary)
    try:
        put_split(*STEPS[0])
        stop = threading.Event()
        samples = []
        started = time.monotonic()
        threads = start_load(samples, stop)
        marks = []
        for blue, green in STEPS:
            put_split(blue, green)
            marks.append((time.monotonic(), (blue, green)))
            time.sleep(args.hold)
        stop.set()
        for t in threads:
            t.join(timeout=10)
    finally:
        stop_demo(demo)
    failed = sum(1 for _, o, _ in samples if o == "error")
    for i, (t0, (b, g)) in enumerate(marks):
        t1 = marks[i + 1][0] if i + 1 < len(marks) else float("inf")
        window = [o for t, o, _ in samples if t0 + 0.1 <= t < t1 and o != "error"]
        share = sum(1 for o in window if o == "green") / max(1, len(window))
        print(f"split {b:3}/{g:<3}: green share {share:.3f} of {len(window)} requests")
    print(f"{len(samples)} requests, {failed} failed")
    title = f"Canary 100/0 -> 0/100 under 16 clients: {len(samples)} requests, {failed} failed"
    plot(samples, [(t, f"{b}/{g}", "grey") for t, (b, g) in marks], started, args.out, title)
    print(f"plot written to {args.out}")
    return 1 if failed else 0


def watch_rollout(stop, history):
    """Polls the rollout every 20 ms: (time, state, weight) at each change."""
    last = None
    while not stop.is_set():
        status = call(ADMIN, "GET", "/api/v1/routes/web/rollout")
        now = (status["state"], status["weight"])
        if now != last:
            history.append((time.monotonic(), *now, status.get("reason")))
            last = now
        time.sleep(0.02)


def rollback(args):
    demo = start_demo(args.binary)
    try:
        stop, watching = threading.Event(), threading.Event()
        samples, history = [], []
        started = time.monotonic()
        threads = start_load(samples, stop)
        time.sleep(2)
        call(ADMIN, "POST", "/api/v1/routes/web/rollout", ROLLOUT, expect=201)
        watcher = threading.Thread(target=watch_rollout, args=(watching, history), daemon=True)
        watcher.start()
        deadline = time.monotonic() + 60
        while not any(w == 50 for _, _, w, _ in history):
            if time.monotonic() > deadline:
                raise SystemExit(f"the rollout never reached 50%: {history}")
            time.sleep(0.02)
        time.sleep(1)
        bad_at = time.monotonic()
        print(call(GREEN, "POST", CHAOS).strip())
        while not any(s != "progressing" for _, s, _, _ in history):
            if time.monotonic() > deadline:
                raise SystemExit(f"the rollout never ended: {history}")
            time.sleep(0.02)
        time.sleep(3)
        stop.set()
        watching.set()
        for t in threads + [watcher]:
            t.join(timeout=10)
    finally:
        stop_demo(demo)
    for t, state, weight, _ in history:
        print(f"{t - started:6.2f} s  {state:<12} green {weight:g}%")
    end_t, state, _, reason = history[-1]
    print(f"reason: {reason}")
    first_bad = min((t for t, o, u in samples if o == "error" and u == "green" and t >= bad_at), default=None)
    if first_bad is None:
        raise SystemExit("green never failed a request after /chaos")
    green_failed = [t for t, o, u in samples if o == "error" and u == "green"]
    blue_failed = sum(1 for _, o, u in samples if o == "error" and u != "green")
    after = sum(1 for t, o, _ in samples if o == "green" and t > end_t)
    print(f"{len(samples)} requests; green failed {len(green_failed)}, blue or the balancer {blue_failed}")
    print(
        f"first bad answer to green at 0%: {end_t - first_bad:.2f} s "
        f"({sum(1 for t in green_failed if t <= end_t)} failed requests from green meanwhile; "
        f"{after} answers from green after it)"
    )
    title = (
        f"Automatic rollback under 16 clients: green fails 30% of its answers at 50%,\n"
        f"is back at 0% {end_t - first_bad:.2f} s after its first 500: "
        f"{len(green_failed)} failed of {len(samples)} requests"
    )
    marks = [(t, f"green {w:g}%", "grey") for t, s, w, _ in history if s == "progressing"]
    marks += [(first_bad, "green starts failing 30%", "#d62728")]
    marks += [(end_t, f"{state}: green 0%", "black")]
    plot(samples, marks, started, args.out, title)
    print(f"plot written to {args.out}")
    return 0 if state == "rolled_back" and blue_failed == 0 else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default="target/release/switchyard")
    parser.add_argument("--scenario", choices=["canary", "rollback"], default="canary")
    parser.add_argument("--out", default=None, help="the plot (default docs/<scenario>.png)")
    parser.add_argument("--hold", type=float, default=3.0, help="canary: seconds per step")
    args = parser.parse_args()
    args.out = args.out or f"docs/{args.scenario}.png"
    sys.exit(canary(args) if args.scenario == "canary" else rollback(args))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Canary deploy, shown: runs `switchyard demo`, sends load from 16 clients (half keep-alive,
half a new connection per request), shifts the split 100/0 -> 99/1 -> 90/10 -> 50/50 -> 0/100
through the admin API, and plots requests per version and errors over time.

    python3 deploy/canary_demo.py --binary target/release/switchyard --out docs/canary.png

Exits 1 if any request failed. Only 127.0.0.1 is contacted.
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
STEPS = [(100, 0), (99, 1), (90, 10), (50, 50), (0, 100)]
CLIENTS = 16
PACE = 0.005


def wait_for_port(address, limit=30.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            socket.create_connection(address, timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {address[0]}:{address[1]}")


def put_split(blue, green):
    conn = http.client.HTTPConnection(*ADMIN, timeout=5)
    conn.request("PUT", "/api/v1/routes/web/split", json.dumps({"blue": blue, "green": green}))
    response = conn.getresponse()
    body = response.read()
    conn.close()
    if response.status != 200:
        raise SystemExit(f"split {blue}/{green} refused: {response.status} {body!r}")


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
            if 200 <= response.status < 300:
                outcome = "green" if "green" in body else "blue"
            else:
                outcome = "error"
        except (OSError, http.client.HTTPException):
            outcome = "error"
            if conn is not None:
                conn.close()
            conn = None
        samples.append((time.monotonic(), outcome))
        time.sleep(PACE)


def plot(samples, marks, started, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.25
    end = max(t for t, _ in samples)
    bins = int((end - started) / width) + 1
    series = {k: [0] * bins for k in ("blue", "green", "error")}
    for t, outcome in samples:
        series[outcome][int((t - started) / width)] += 1
    xs = [i * width for i in range(bins)]
    rate = lambda k: [n / width for n in series[k]]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.plot(xs, rate("blue"), color="#1f5fbf", label="blue (v1) requests/s")
    ax.plot(xs, rate("green"), color="#2e9e4f", label="green (v2) requests/s")
    ax.plot(xs, rate("error"), color="#d62728", linewidth=2, label="failed requests/s")
    for t, (b, g) in marks:
        ax.axvline(t - started, color="grey", linestyle=":", linewidth=1)
        ax.text(t - started + 0.05, ax.get_ylim()[1] * 0.95, f"{b}/{g}", fontsize=8, va="top")
    total = len(samples)
    failed = sum(1 for _, outcome in samples if outcome == "error")
    ax.set_title(f"Canary 100/0 -> 0/100 under 16 clients: {total} requests, {failed} failed")
    ax.set_xlabel("seconds")
    ax.set_ylabel("requests per second")
    ax.legend(loc="center left")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default="target/release/switchyard")
    parser.add_argument("--out", default="docs/canary.png")
    parser.add_argument("--hold", type=float, default=3.0, help="seconds per step")
    args = parser.parse_args()

    demo = subprocess.Popen([args.binary, "demo"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(LB)
        wait_for_port(ADMIN)
        put_split(*STEPS[0])
        stop = threading.Event()
        samples = []
        threads = [
            threading.Thread(target=client, args=(i % 2 == 0, stop, samples), daemon=True)
            for i in range(CLIENTS)
        ]
        started = time.monotonic()
        for t in threads:
            t.start()
        marks = []
        for blue, green in STEPS:
            put_split(blue, green)
            marks.append((time.monotonic(), (blue, green)))
            time.sleep(args.hold)
        stop.set()
        for t in threads:
            t.join(timeout=10)
    finally:
        demo.send_signal(signal.SIGTERM)
        try:
            demo.wait(timeout=15)
        except subprocess.TimeoutExpired:
            demo.kill()
    failed = sum(1 for _, o in samples if o == "error")
    for i, (t0, (b, g)) in enumerate(marks):
        t1 = marks[i + 1][0] if i + 1 < len(marks) else float("inf")
        window = [o for t, o in samples if t0 + 0.1 <= t < t1 and o != "error"]
        share = sum(1 for o in window if o == "green") / max(1, len(window))
        print(f"split {b:3}/{g:<3}: green share {share:.3f} of {len(window)} requests")
    print(f"{len(samples)} requests, {failed} failed")
    plot(samples, marks, started, args.out)
    print(f"plot written to {args.out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

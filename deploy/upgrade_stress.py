#!/usr/bin/env python3
"""Binary upgrades in a row under load, on a busy machine, counting every failed request.

Starts nginx as the backend and `switchyard run`, then runs clients (half opening a connection
per request, half on keep-alive) as fast as they go, while `--busy` processes spin on the CPUs
so that tasks wait for a thread, and upgrades the running process `--upgrades` times (new
process with `--upgrade`, then SIGQUIT to the old one). Prints the count of requests and of
failures, each failure with its time relative to the nearest SIGQUIT or old-process exit.
Exit code 1 when a request failed. Everything listens on 127.0.0.1.

    make upgrade-stress        # or: deploy/upgrade_stress.py --binary target/release/switchyard
"""
import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

REQUEST = b"GET / HTTP/1.1\r\nHost: stress\r\n\r\n"


def free_ports(count):
    """Distinct free ports: all are held until each has been chosen."""
    held = [socket.socket() for _ in range(count)]
    for s in held:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in held]
    for s in held:
        s.close()
    return ports


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def wait_for(what, condition, limit=30.0):
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            sys.exit(f"upgrade_stress: timed out waiting for {what}")
        time.sleep(0.02)


def accepts(address):
    try:
        socket.create_connection(address, timeout=1).close()
        return True
    except OSError:
        return False


def read_response(reader):
    """Reads one response; returns whether it said `Connection: close`."""
    if not reader.readline():
        raise OSError("closed before a response")
    length, close = 0, False
    while True:
        line = reader.readline()
        if not line:
            raise OSError("closed inside the response head")
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value == b"close":
            close = True
    if len(reader.read(length)) != length:
        raise OSError("short body")
    return close


class Clients:
    def __init__(self, address, count):
        self.address = address
        self.stop = threading.Event()
        self.ok = 0
        self.failures = []
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self.keep_alive if i % 2 else self.new_connections)
            for i in range(count)
        ]
        for t in self.threads:
            t.start()

    def record(self, kind, error=None):
        with self.lock:
            if error is None:
                self.ok += 1
            else:
                self.failures.append((kind, time.monotonic(), error))

    def new_connections(self):
        while not self.stop.is_set():
            try:
                with socket.create_connection(self.address, timeout=10) as s:
                    s.sendall(REQUEST)
                    read_response(s.makefile("rb"))
                self.record("new connection")
            except OSError as e:
                self.record("new connection", str(e))

    def keep_alive(self):
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = socket.create_connection(self.address, timeout=10)
                    reader = conn.makefile("rb")
                conn.sendall(REQUEST)
                if read_response(reader):
                    conn.close()
                    conn = None
                self.record("keep-alive")
            except OSError as e:
                self.record("keep-alive", str(e))
                conn = None

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default="target/release/switchyard")
    parser.add_argument("--upgrades", type=int, default=40)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--busy", type=int, default=2, help="processes spinning on the CPUs")
    parser.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="switchyard-stress-")
    backend_port, proxy_port = free_ports(2)
    backend = ("127.0.0.1", backend_port)
    proxy = ("127.0.0.1", proxy_port)
    socket_path = os.path.join(work, "upgrade.sock")
    nginx_conf = write(
        os.path.join(work, "nginx.conf"),
        f"worker_processes 1; daemon off; master_process off; pid {work}/nginx.pid;\n"
        f"error_log {work}/nginx.err; events {{ worker_connections 4096; }}\n"
        f"http {{ access_log off; server {{ listen {backend[0]}:{backend[1]} backlog=4096;\n"
        f"  keepalive_requests 1000000; location / {{ return 200 \"ok\\n\"; }} }} }}\n",
    )
    config = write(
        os.path.join(work, "switchyard.yaml"),
        f"server:\n  threads: 2\n  max_connections: 4096\n  upgrade_socket: {socket_path}\n"
        f"listeners:\n  - address: {proxy[0]}:{proxy[1]}\n"
        f"upstreams:\n  app:\n    backends:\n      - address: {backend[0]}:{backend[1]}\n"
        "routes:\n  - name: all\n    split:\n      app: 1\n",
    )
    log = open(os.path.join(work, "switchyard.log"), "w")
    started = []

    def start(*extra):
        p = subprocess.Popen([args.binary, "run", "--config", config, *extra], stdout=log, stderr=log)
        started.append(p)
        return p

    nginx = subprocess.Popen([args.nginx, "-c", nginx_conf])
    started.append(nginx)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    started.extend(busy)
    clients = None
    try:
        wait_for("nginx", lambda: accepts(backend))
        current = start()
        wait_for("switchyard", lambda: accepts(proxy))
        clients = Clients(proxy, args.clients)
        marks = []
        for _ in range(args.upgrades):
            time.sleep(0.5)
            if os.path.exists(socket_path):
                os.unlink(socket_path)
            successor = start("--upgrade")
            wait_for("the new process's upgrade socket", lambda: os.path.exists(socket_path))
            current.send_signal(signal.SIGQUIT)
            marks.append(("SIGQUIT", time.monotonic()))
            current.wait(timeout=120)
            marks.append(("old process exit", time.monotonic()))
            current = successor
        time.sleep(0.5)
    finally:
        if clients:
            clients.finish()
        for p in started:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in started:
            p.wait(timeout=30)
    print(
        f"{args.upgrades} upgrades, {args.clients} clients, {args.busy} busy loops: "
        f"{clients.ok + len(clients.failures)} requests, {len(clients.failures)} failed "
        f"(log: {log.name})"
    )
    for kind, at, error in clients.failures:
        name, mark = min(marks, key=lambda m: abs(m[1] - at))
        print(f"  {kind}: {error} ({at - mark:+.3f} s from {name})")
    return 1 if clients.failures else 0


if __name__ == "__main__":
    sys.exit(main())

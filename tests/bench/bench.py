#!/usr/bin/env python3
"""Switchyard against nginx and HAProxy: throughput, latency, CPU per request, memory per
idle connection, syscalls and allocations per request; and against two bare Pingora
references (crates/switchyard-bench-refs), the framework's floor under it. `make bench` builds
the binaries and runs this; by hand:

    python3 tests/bench/bench.py --binary target/release/switchyard [--scenarios a,c,idle-1000]
        [--pingora-proxy target/release/bare-pingora-proxy]
        [--pingora-core target/release/bare-pingora-core] [--duration 5] [--rounds 3] [--no-docs]

Needs nginx, haproxy, wrk and taskset on PATH (perf optional: syscall counts), matplotlib for
the chart. All traffic stays on 127.0.0.1; every process it starts runs from a fresh temp
directory and is stopped by its own PID. Results go to stdout, to <tmp>/results.json and,
unless --no-docs, between the markers of docs/benchmarks.md and to docs/benchmarks.png.
Exits 1 when a run saw any error (a failed request), 2 when it could not run.
"""
import argparse
import atexit
import ctypes
import datetime
import json
import os
import platform
import re
import resource
import shutil
import shlex
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYSTEMS = ["switchyard", "pingora-proxy", "pingora-core", "nginx", "haproxy"]
LABEL = {"switchyard": "Switchyard", "nginx": "nginx", "haproxy": "HAProxy",
         "pingora-proxy": "bare pingora-proxy", "pingora-core": "bare pingora-core"}
# The reference systems (crates/switchyard-bench-refs, bench only): the framework under
# Switchyard with nothing of ours on top; see serves() for the scenarios they run.
REFS = ("pingora-proxy", "pingora-core")
MARK_START = "<!-- results:start -->"
MARK_END = "<!-- results:end -->"
CLIENT_CONNECTIONS = 50
IDLE_CONNECTIONS = 1000
# Under every system's default head limit (nginx: 8 KiB per header line, HAProxy: 16 KiB
# buffers, Switchyard: 64 KiB), so each one holds it.
PENDING_HEAD_BYTES = 6000
ALLOC_REQUESTS = (2000, 22000)
BODY_16K = 16 * 1024
WARMUP_SECONDS = 1
# h2-streams: h2load -c H2_CLIENTS -m H2_STREAMS
H2_CLIENTS = 10
H2_STREAMS = 32
# The name in the benchmark certificate (SAN DNS:bench.local and IP:127.0.0.1).
TLS_NAME = "bench.local"
# fixed-rate-1t: the share of nginx's keepalive-1t req/s that every system is sent, and the
# target on Switchyard's p99 (at most this times the better peer's)
RATE_SHARE = 0.5
RATE_P99_TARGET = 1.2
# a round that achieved less than this share of the rate is flagged (the generator fell behind)
RATE_BEHIND = 0.95


class Scenario:
    def __init__(self, letter, name, title, kind="wrk", threads=1, backends=1, algorithm="rr",
                 routes=0, path="/", big=False, close=False, tls=None, resume=False, h2=False,
                 access_log=False, fixed_rate=False, connections=None,
                 idle=IDLE_CONNECTIONS):
        self.letter = letter
        self.name = name
        self.title = title
        self.kind = kind  # wrk | idle | pending | alloc
        self.threads = threads
        self.pinned = threads == 1
        self.backends = backends
        self.algorithm = algorithm  # rr | least_conn | ip_hash
        self.routes = routes
        self.path = path
        self.big = big
        self.close = close
        # TLS on the client side of the balancer: None (plain HTTP) | "ecdsa" | "rsa" (which
        # certificate every balancer serves). With close=True every request is a new TLS
        # connection; resume says whether the client offers the session it got from the
        # previous one (wrk keeps it; the no-resume shim makes it forget it).
        self.tls = tls
        self.resume = resume
        self.h2 = h2  # HTTP/2 over TLS (ALPN h2), loaded by h2load instead of wrk
        # Every balancer writes an access log line per request to a file in the work dir:
        # Switchyard JSON (its default), nginx the same fields as JSON with a 64 KiB buffer
        # (`buffer=64k flush=1s`: batched writes, as ours), HAProxy `option httplog` to stdout
        # (a file; one write per line, HAProxy's only way without a syslog daemon).
        self.access_log = access_log
        self.client = "oha" if fixed_rate else "h2load" if h2 else "wrk"
        self.connections = connections or (H2_CLIENTS if h2 else CLIENT_CONNECTIONS)
        # fixed_rate: oha sends `rate` req/s (open loop, see run_oha), set by
        # run_rate_scenario before the scenario runs
        self.rate = None
        # Client connections the memory scenarios (idle, pending) hold open at once.
        self.idle = idle

    @property
    def handshakes(self):
        """Every request is one TLS handshake (full or resumed): CPU per request is CPU per
        handshake."""
        return bool(self.tls) and self.close


SCENARIOS = [
    Scenario("a", "keepalive-1t", "keep-alive, tiny responses, 1 worker thread"),
    Scenario("r", "keepalive-1t-log", "keepalive-1t with an access log line per request to a "
             "file", access_log=True),
    Scenario("b", "keepalive-2t", "keep-alive, tiny responses, 2 worker threads (nothing pinned)",
             threads=2),
    Scenario("t", "keepalive-2t-4c", "keepalive-2t with only 4 client connections: how evenly "
             "each balancer spreads few connections over its 2 workers", threads=2,
             connections=4),
    Scenario("c", "new-conn", "a new client connection per request, 1 thread", close=True),
    Scenario("d", "16k", "16 KiB responses, keep-alive, 1 thread", path="/16k.bin", big=True),
    Scenario("e", "100-backends", "round robin over 100 backends, 1 thread", backends=100),
    Scenario("f", "100-routes", "100 path-prefix routes, request matches the last, 1 thread",
             routes=100, path="/r99/x"),
    Scenario("g", "least-conn", "least connections over 4 backends, 1 thread", backends=4,
             algorithm="least_conn"),
    Scenario("h", "ip-hash", "ip hash over 4 backends, 1 thread", backends=4,
             algorithm="ip_hash"),
    Scenario("k", "shared-pool-2t", "2 threads, 100 backends, a new client connection per request "
             "(nothing pinned)", threads=2, backends=100, close=True),
    Scenario("l", "tls-handshake-ecdsa", "a new TLS connection per request, full TLS 1.3 "
             "handshake (no resumption), ECDSA P-256 certificate, 1 thread", close=True,
             tls="ecdsa"),
    Scenario("m", "tls-handshake-rsa", "a new TLS connection per request, full TLS 1.3 "
             "handshake (no resumption), RSA 2048 certificate, 1 thread", close=True, tls="rsa"),
    Scenario("n", "tls-resume", "a new TLS connection per request, resumed TLS 1.3 handshake "
             "(session ticket), ECDSA P-256, 1 thread", close=True, tls="ecdsa", resume=True),
    Scenario("o", "tls-keepalive", "HTTPS/1.1 keep-alive, tiny responses, ECDSA P-256, "
             "1 thread", tls="ecdsa"),
    Scenario("q", "h2-streams", "HTTP/2 over TLS, 10 connections x 32 concurrent streams, tiny "
             "responses, ECDSA P-256, 1 thread", tls="ecdsa", h2=True),
    Scenario("s", "fixed-rate-1t", f"keep-alive, tiny responses, 1 thread, at a fixed "
             f"{RATE_SHARE:.0%} of nginx's maximum req/s (oha, latency-corrected)",
             fixed_rate=True),
    Scenario("i", "idle-1000", "resident memory per idle client connection (1 000 connections)",
             kind="idle"),
    Scenario("u", "idle-10000", "resident memory per idle client connection (10 000 "
             "connections; not in `all`)", kind="idle", idle=10000),
    Scenario("p", "pending-heads", "resident memory per client connection holding an unfinished "
             f"{PENDING_HEAD_BYTES}-byte request head (1 000 connections)", kind="pending"),
    Scenario("j", "allocs", "heap allocations per proxied request (Switchyard only)",
             kind="alloc"),
]

WRK_SCRIPT = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d bytes=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout))
  for _, p in ipairs({50, 75, 90, 99, 99.9}) do
    io.write(string.format("BENCH_LAT %s %d\n", tostring(p), latency:percentile(p)))
  end
  io.write(string.format("BENCH_LAT max %d\n", latency.max))
end
"""


class BenchError(Exception):
    """Stops the run with a message (and the offending process's output)."""


# --------------------------------------------------------------------------------------------
# processes


STARTED = []


class Proc:
    """A process this run started; stopped by its own PID only."""

    def __init__(self, name, cmd, workdir, env=None, cwd=None):
        self.name = name
        self.cmd = cmd
        self.out_path = os.path.join(workdir, f"{name}.stdout")
        self.err_path = os.path.join(workdir, f"{name}.stderr")
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                          env=env, cwd=cwd or workdir)
        self.pid = self.popen.pid
        self.children_seen = set()
        STARTED.append(self)

    def alive(self):
        return self.popen.poll() is None

    def stderr_tail(self, limit=4000):
        text = ""
        for path in (self.err_path, self.out_path):
            try:
                with open(path, "rb") as f:
                    data = f.read().decode(errors="replace")
            except OSError:
                continue
            if data.strip():
                text += data
        return text[-limit:] if text else "(no output)"

    def children(self):
        kids = children_of(self.pid)
        self.children_seen.update((k, proc_start(k)) for k in kids)
        return kids

    def stop(self, timeout=10.0):
        if self.alive():
            self.children()
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
            except ProcessLookupError:
                pass
        # nginx's workers normally leave with their master; make sure, by their own PIDs
        # (the start time tells a leftover worker from a new process that reuses its PID).
        for kid, start in list(self.children_seen):
            if proc_start(kid) == start:
                try:
                    os.kill(kid, signal.SIGKILL)
                except OSError:
                    pass
        self.children_seen.clear()
        if self in STARTED:
            STARTED.remove(self)
        return self.popen.returncode


def stop_all():
    for p in list(reversed(STARTED)):
        try:
            p.stop(timeout=5)
        except Exception as e:  # noqa: BLE001 - best effort at exit
            print(f"warning: could not stop {p.name} (pid {p.pid}): {e}", file=sys.stderr)


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)


def stat_fields(pid):
    """Fields of /proc/PID/stat from field 3 on (field n is at n - 3), or None when the
    process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()


def read_stat(pid):
    """(ppid, utime, stime) in clock ticks, or None when the process is gone."""
    rest = stat_fields(pid)
    return None if rest is None else (int(rest[1]), int(rest[11]), int(rest[12]))


def proc_start(pid):
    """Start time (field 22), to recognise a process by more than its PID."""
    rest = stat_fields(pid)
    return None if rest is None else int(rest[19])


def children_of(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = read_stat(int(entry))
            if st and st[0] == pid:
                kids.append(int(entry))
    return sorted(kids)


def cpu_ticks(pids):
    user = system = 0
    for pid in pids:
        st = read_stat(pid)
        if st is None:
            raise BenchError(f"process {pid} disappeared during a measurement")
        user += st[1]
        system += st[2]
    return user, system


def rss_kib(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


# --------------------------------------------------------------------------------------------
# tiny HTTP/1.1 client (exact request counts, readiness, sanity checks)


class HttpConn:
    def __init__(self, port, timeout=5.0, tls=None):
        """tls: an ssl.SSLContext (client_tls_context) for HTTPS, None for plain HTTP."""
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname=TLS_NAME)
        self.port = port
        self.buf = b""

    def close(self):
        self.sock.close()

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed by the server")
        self.buf += data

    def send(self, path, close=False):
        extra = "Connection: close\r\n" if close else ""
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                          f"User-Agent: switchyard-bench\r\n{extra}\r\n".encode())

    def read_response(self):
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            n = int(headers["content-length"])
            while len(self.buf) < n:
                self._fill()
            body, self.buf = self.buf[:n], self.buf[n:]
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    self._fill()
                size_line, self.buf = self.buf.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                while len(self.buf) < size + 2:
                    self._fill()
                body += self.buf[:size]
                self.buf = self.buf[size + 2:]
                if size == 0:
                    break
        else:
            body = self.buf
            try:
                while True:
                    data = self.sock.recv(65536)
                    if not data:
                        break
                    body += data
            except OSError:
                pass
            self.buf = b""
        return status, headers, body

    def get(self, path, close=False):
        self.send(path, close)
        return self.read_response()


def client_tls_context(cafile):
    """Python's OpenSSL client for readiness and sanity checks: verifies the benchmark
    certificate (its own CA) for bench.local, HTTP/1.1 only."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = True
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def http_get_once(port, path, timeout=2.0, tls=None):
    conn = HttpConn(port, timeout, tls)
    try:
        return conn.get(path, close=True)
    finally:
        conn.close()


def wait_ready(proc, port, path, limit=30.0, tls=None):
    deadline = time.monotonic() + limit
    last = "no answer"
    plain = 0
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited with code {proc.popen.returncode} before it "
                             f"answered.\ncommand: {' '.join(proc.cmd)}\n--- its output ---\n"
                             f"{proc.stderr_tail()}")
        try:
            status, _, body = http_get_once(port, path, tls=tls)
            if status == 200:
                return
            last = f"status {status}: {body[:200]!r}"
        except (OSError, ValueError, IndexError) as e:  # ssl.SSLError is an OSError
            last = str(e)
            # a listener that answers TLS with plain HTTP will not change its mind
            plain = plain + 1 if isinstance(e, ssl.SSLError) and \
                "WRONG_VERSION_NUMBER" in str(e).upper() else 0
            if plain >= 20:
                raise BenchError(f"{proc.name} answers plain HTTP, not TLS, on 127.0.0.1:{port} "
                                 f"({last}): no TLS listener")
        time.sleep(0.05)
    raise BenchError(f"{proc.name} did not answer 200 on {'https' if tls else 'http'}://"
                     f"127.0.0.1:{port}{path} within "
                     f"{limit:.0f} s (last: {last}).\n--- its output ---\n{proc.stderr_tail()}")


def ports_free(ports):
    busy = []
    for port in ports:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            busy.append(port)
        finally:
            s.close()
    if busy:
        raise BenchError(f"ports already in use on 127.0.0.1: {busy[:10]} (choose another "
                         f"--base-port)")


# --------------------------------------------------------------------------------------------
# configs


class Layout:
    def __init__(self, base):
        self.backend_ports = [base + i for i in range(100)]
        self.stub_port = base + 100
        self.lb_port = {"switchyard": base + 110, "nginx": base + 111, "haproxy": base + 112,
                        "pingora-proxy": base + 113, "pingora-core": base + 114}

    def all_ports(self):
        return self.backend_ports + [self.stub_port] + list(self.lb_port.values())


def user_line():
    return "user root;\n" if os.geteuid() == 0 else ""


def backend_nginx_conf(work, layout, n_ports):
    listens = "\n".join(f"    listen 127.0.0.1:{p} backlog=4096;"
                        for p in layout.backend_ports[:n_ports])
    return f"""# backend: one nginx process, {n_ports} port(s)
{user_line()}daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {work}/backend.pid;
error_log {work}/backend-error.log warn;
events {{ worker_connections 10000; }}
http {{
  access_log off;
  default_type text/plain;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  server {{
{listens}
    root {work}/static;
    add_header X-Port $server_port;
    location = /16k.bin {{ }}
    location / {{ return 200 "ok\\n"; }}
  }}
  server {{
    listen 127.0.0.1:{layout.stub_port};
    location = /status {{ stub_status; }}
  }}
}}
"""


def upstream_names(sc):
    return [f"u{i}" for i in range(sc.routes)] if sc.routes else ["pool"]


def switchyard_conf(work, sc, layout, cert=None):
    algorithm = {"rr": "round_robin", "least_conn": "least_connections",
                 "ip_hash": "ip_hash"}[sc.algorithm]
    out = [
        "server:",
        f"  threads: {sc.threads}",
        "  grace_period: 5s",
        # Fits a hard open-file limit of 20 000 (this kind of machine); the default 10 000
        # connections would need 20 256 descriptors. More for idle-10000, whose descriptors
        # are almost all client connections (Switchyard raises its own limit, as root).
        f"  max_connections: {max(4096, sc.idle + 64)}",
        f"  upgrade_socket: {work}/sy.sock",
        "listeners:",
        f"  - address: 127.0.0.1:{layout.lb_port['switchyard']}",
    ]
    if sc.tls:
        # TLS 1.2 and 1.3 (min_version default "1.2"), session tickets on (the default), and
        # the session cache rustls keeps anyway; ALPN h2 only where the scenario is HTTP/2.
        out += [
            "    tls:",
            "      certificates:",
            f"        - cert: {cert['cert']}",
            f"          key: {cert['key']}",
            '      min_version: "1.2"',
            "      session_tickets: true",
            f"    http2: {'true' if sc.h2 else 'false'}",
        ]
    if sc.access_log:
        out += ["access_log:", f"  path: {work}/switchyard-access.log", "  format: json"]
    out += [
        "upstreams:",
    ]
    for name in upstream_names(sc):
        out += [f"  {name}:", f"    algorithm: {algorithm}", "    backends:"]
        out += [f"      - address: 127.0.0.1:{p}" for p in layout.backend_ports[:sc.backends]]
    out.append("routes:")
    if sc.routes:
        for i in range(sc.routes):
            out += [f"  - name: r{i}", f"    path_prefix: /r{i}/", "    split:", f"      u{i}: 1"]
    else:
        out += ["  - name: all", "    path_prefix: /", "    split:", "      pool: 1"]
    return "\n".join(out) + "\n"


def nginx_keepalive(sc):
    """nginx's `keepalive N` is one LRU cache of idle connections per worker shared by all the
    upstream's servers: 64 for 100 servers made it open a new backend connection for most
    requests, so it grows with the number of servers."""
    return max(64, 4 * sc.backends)


def nginx_lb_conf(work, sc, layout, name, cert=None):
    method = {"rr": "", "least_conn": "    least_conn;\n", "ip_hash": "    ip_hash;\n"}
    servers = "".join(f"    server 127.0.0.1:{p};\n" for p in layout.backend_ports[:sc.backends])
    upstreams = "".join(
        f"  upstream {name} {{\n{method[sc.algorithm]}{servers}"
        f"    keepalive {nginx_keepalive(sc)};\n"
        f"    keepalive_requests 1000000;\n    keepalive_timeout 60s;\n  }}\n"
        for name in upstream_names(sc))
    if sc.routes:
        locations = "".join(f"    location /r{i}/ {{ proxy_pass http://u{i}; }}\n"
                            for i in range(sc.routes))
    else:
        locations = "    location / { proxy_pass http://pool; }\n"
    listen_opts = ""
    tls = ""
    if sc.tls:
        listen_opts = " ssl http2" if sc.h2 else " ssl"
        tls = (f"    ssl_certificate {cert['cert']};\n"
               f"    ssl_certificate_key {cert['key']};\n"
               f"    ssl_protocols TLSv1.2 TLSv1.3;\n"
               f"    ssl_session_cache shared:SSL:10m;\n"
               f"    ssl_session_tickets on;\n")
    access_log = "access_log off;"
    if sc.access_log:
        access_log = (
            "log_format switchyard escape=json '{\"time\":\"$time_iso8601\",\"client\":"
            "\"$remote_addr\",\"method\":\"$request_method\",\"host\":\"$http_host\","
            "\"path\":\"$uri\",\"query\":\"$args\",\"protocol\":\"$server_protocol\","
            "\"status\":$status,\"bytes_sent\":$body_bytes_sent,\"duration_ms\":"
            "$request_time,\"upstream\":\"$upstream_addr\",\"request_id\":\"$request_id\","
            "\"user_agent\":\"$http_user_agent\"}';\n"
            f"  access_log {work}/{name}-access.log switchyard buffer=64k flush=1s;")
    return f"""# nginx as the load balancer: {sc.name}
{user_line()}daemon off;
master_process on;
worker_processes {sc.threads};
worker_rlimit_nofile {max(20000, 2 * sc.idle + 256)};
pid {work}/{name}.pid;
error_log {work}/{name}-error.log warn;
events {{ worker_connections {max(10000, sc.idle + 256)}; }}
http {{
  {access_log}
  keepalive_requests 1000000;
  keepalive_timeout 300s;
{upstreams}  server {{
    listen 127.0.0.1:{layout.lb_port['nginx']}{listen_opts} backlog=4096;
{tls}    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $http_host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header X-Forwarded-Host $host;
{locations}  }}
}}
"""


def haproxy_conf(work, sc, layout, cert=None):
    balance = {"rr": "roundrobin", "least_conn": "leastconn",
               "ip_hash": "source\n  hash-type consistent"}[sc.algorithm]
    servers = "".join(f"  server s{i} 127.0.0.1:{p}\n"
                      for i, p in enumerate(layout.backend_ports[:sc.backends]))
    backends = "".join(f"backend {name}\n  balance {balance}\n{servers}\n"
                       for name in upstream_names(sc))
    if sc.routes:
        rules = "".join(f"  acl r{i} path_beg /r{i}/\n  use_backend u{i} if r{i}\n"
                        for i in range(sc.routes))
    else:
        rules = "  default_backend pool\n"
    bind_tls = ""
    global_tls = ""
    if sc.tls:
        # HAProxy's defaults keep a session cache (tune.ssl.cachesize 20000) and send TLS
        # 1.3 session tickets; ALPN h2 only where the scenario is HTTP/2.
        alpn = "h2,http/1.1" if sc.h2 else "http/1.1"
        bind_tls = f" ssl crt {cert['pem']} alpn {alpn}"
        # prefer-client-ciphers: the client's order picks the TLS 1.3 cipher, as nginx
        # (ssl_prefer_server_ciphers off) and rustls do; HAProxy's default is its own order
        global_tls = "  ssl-default-bind-options ssl-min-ver TLSv1.2 prefer-client-ciphers\n"
    proto = "https" if sc.tls else "http"
    global_log, defaults_log = "", ""
    if sc.access_log:
        global_log = "  log stdout format raw local0\n"
        defaults_log = "  log global\n  option httplog\n"
    return f"""# HAProxy as the load balancer: {sc.name}
global
  nbthread {sc.threads}
  maxconn {max(4000, sc.idle + 256)}
{global_log}{global_tls}
defaults
  mode http
{defaults_log}
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
  http-reuse always
  option forwardfor

frontend fe
  bind 127.0.0.1:{layout.lb_port['haproxy']}{bind_tls} backlog 4096
  http-request set-header X-Forwarded-Proto {proto}
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
{rules}
{backends}"""


# --------------------------------------------------------------------------------------------
# TLS: certificates, the no-resume shim for wrk, a capture of the handshakes


def make_certs(tools, work):
    """One self-signed certificate per key type, made once per run with the openssl CLI and
    served by all three balancers: {"ecdsa"|"rsa": {"cert", "key", "pem" (cert + key, for
    HAProxy), "ca" (the certificate itself: what the sanity checks trust)}}."""
    d = os.path.join(work, "tls")
    os.makedirs(d, exist_ok=True)
    out = {}
    for kind, newkey in (("ecdsa", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]),
                         ("rsa", ["-newkey", "rsa:2048"])):
        cert, key, pem = (os.path.join(d, f"{kind}.{ext}") for ext in ("crt", "key", "pem"))
        cmd = [tools.openssl, "req", "-x509", *newkey, "-nodes", "-keyout", key, "-out", cert,
               "-days", "30", "-subj", f"/CN={TLS_NAME}",
               "-addext", f"subjectAltName=DNS:{TLS_NAME},IP:127.0.0.1"]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            raise BenchError(f"openssl req failed: {shlex.join(cmd)}\n{r.stdout}")
        with open(pem, "w") as f:
            f.write(open(cert).read() + open(key).read())
        os.chmod(key, 0o644)  # nginx workers may run as another user
        os.chmod(pem, 0o644)
        text = run_text([tools.openssl, "x509", "-in", cert, "-noout", "-text"])
        algo = first_match(r"Public Key Algorithm: (\S+)", text)
        bits = first_match(r"Public-Key: \((\d+) bit\)", text)
        curve = first_match(r"NIST CURVE: (\S+)", text) if kind == "ecdsa" else ""
        out[kind] = {"cert": cert, "key": key, "pem": pem, "ca": cert,
                     "describe": f"{algo} {bits} bit{' ' + curve if curve else ''}"}
    return out


# Two things wrk does that a browser does not, undone by this shim, LD_PRELOADed into wrk
# for every https run:
# - its SNI is the URL's host, here the IP address 127.0.0.1 (RFC 6066 allows only DNS names;
#   rustls ignores it and logs a warning per handshake): with WRK_SNI set, SSL_ctrl's
#   SSL_CTRL_SET_TLSEXT_HOSTNAME (55) sends that name instead (bench.local, the
#   certificate's, as a browser opening https://bench.local/ would);
# - it reconnects with SSL_shutdown + SSL_clear on the same SSL object, which keeps the
#   session: its next handshake offers it (TLS 1.3 PSK from the server's ticket) and every
#   server here resumes it. With WRK_NO_RESUME=1 the session is dropped after SSL_clear, so
#   every reconnect is a full handshake. The capture checks both.
WRK_SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdlib.h>
typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;

int SSL_clear(SSL *s) {
    static int (*real_clear)(SSL *);
    static int (*set_session)(SSL *, SSL_SESSION *);
    if (!real_clear) {
        real_clear = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_clear");
        set_session = (int (*)(SSL *, SSL_SESSION *))dlsym(RTLD_NEXT, "SSL_set_session");
    }
    int r = real_clear(s);
    const char *no_resume = getenv("WRK_NO_RESUME");
    if (no_resume && no_resume[0] == '1')
        set_session(s, NULL);
    return r;
}

long SSL_ctrl(SSL *s, int cmd, long larg, void *parg) {
    static long (*real_ctrl)(SSL *, int, long, void *);
    if (!real_ctrl)
        real_ctrl = (long (*)(SSL *, int, long, void *))dlsym(RTLD_NEXT, "SSL_ctrl");
    const char *sni = getenv("WRK_SNI");
    if (cmd == 55 /* SSL_CTRL_SET_TLSEXT_HOSTNAME */ && sni && sni[0])
        parg = (void *)sni;
    return real_ctrl(s, cmd, larg, parg);
}
"""


def build_wrk_shim(tools, work):
    src = write(os.path.join(work, "wrk-tls-shim.c"), WRK_SHIM_C)
    lib = os.path.join(work, "wrk-tls-shim.so")
    r = subprocess.run([tools.cc, "-shared", "-fPIC", "-O2", "-o", lib, src, "-ldl"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise BenchError(f"could not build wrk's TLS shim: {r.stdout}")
    return lib


TLS_VERSIONS = {0x0304: "TLSv1.3", 0x0303: "TLSv1.2", 0x0302: "TLSv1.1", 0x0301: "TLSv1.0"}
TLS_CIPHERS = {0x1301: "TLS_AES_128_GCM_SHA256", 0x1302: "TLS_AES_256_GCM_SHA384",
               0x1303: "TLS_CHACHA20_POLY1305_SHA256", 0xc02b: "ECDHE-ECDSA-AES128-GCM-SHA256",
               0xc02c: "ECDHE-ECDSA-AES256-GCM-SHA384", 0xc02f: "ECDHE-RSA-AES128-GCM-SHA256",
               0xc030: "ECDHE-RSA-AES256-GCM-SHA384", 0xcca8: "ECDHE-RSA-CHACHA20-POLY1305",
               0xcca9: "ECDHE-ECDSA-CHACHA20-POLY1305"}
TLS_GROUPS = {0x001d: "X25519", 0x0017: "P-256", 0x0018: "P-384", 0x0019: "P-521",
              0x001e: "X448", 0x11ec: "X25519MLKEM768", 0x0100: "ffdhe2048"}
# ServerHello.random of a HelloRetryRequest (RFC 8446 4.1.3)
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")


def _bpf_tls_hellos():
    """Classic BPF for an AF_PACKET socket on lo (14-byte Ethernet header): IPv4 TCP segments
    whose payload starts with a TLS handshake record holding a ClientHello (1) or a
    ServerHello (2). Everything else stays in the kernel."""
    ins = [
        (0x28, 0, 0, 12),          # ldh [12]            ethertype
        (0x15, 0, 15, 0x0800),     # jeq IPv4 else drop
        (0x30, 0, 0, 23),          # ldb [23]            IP protocol
        (0x15, 0, 13, 6),          # jeq TCP else drop
        (0x28, 0, 0, 20),          # ldh [20]            fragment offset
        (0x45, 11, 0, 0x1fff),     # jset -> drop
        (0xb1, 0, 0, 14),          # ldxb 4*([14]&0xf)   X = IP header length
        (0x50, 0, 0, 26),          # ldb [x+26]          TCP data offset byte
        (0x74, 0, 0, 4),           # rsh #4
        (0x64, 0, 0, 2),           # lsh #2              A = TCP header length
        (0x0c, 0, 0, 0),           # add x
        (0x07, 0, 0, 0),           # tax                 X = IP + TCP header length
        (0x50, 0, 0, 14),          # ldb [x+14]          payload[0]: record type
        (0x15, 0, 3, 0x16),        # jeq handshake else drop
        (0x50, 0, 0, 19),          # ldb [x+19]          payload[5]: handshake type
        (0x15, 2, 0, 1),           # jeq ClientHello -> accept
        (0x15, 1, 0, 2),           # jeq ServerHello -> accept
        (0x06, 0, 0, 0),           # drop: ret #0
        (0x06, 0, 0, 0x40000),     # accept: ret whole packet
    ]
    return b"".join(struct.pack("HBBI", *i) for i in ins), len(ins)


def _extensions(body, pos):
    exts = {}
    if pos + 2 > len(body):
        return exts
    end = min(len(body), pos + 2 + struct.unpack_from("!H", body, pos)[0])
    pos += 2
    while pos + 4 <= end:
        typ, ln = struct.unpack_from("!HH", body, pos)
        exts[typ] = body[pos + 4:pos + 4 + ln]
        pos += 4 + ln
    return exts


class TlsCapture:
    """Counts the TLS handshakes on 127.0.0.1:port while it runs: ClientHellos (one per new
    TLS connection), whether they offer a session (TLS 1.3 pre_shared_key, TLS 1.2 session
    ticket or id), and from the ServerHellos (cleartext in TLS 1.3 too) the version, cipher
    suite, key-exchange group and whether the server resumed (pre_shared_key; TLS 1.2: the
    client's session id echoed). The same count for every balancer, seen from the wire,
    independent of the client and the server. Root only (AF_PACKET); the BPF filter keeps
    it to two packets per handshake."""

    def __init__(self, port, cpu=None):
        self.port = port
        self.cpu = cpu  # pin the capture thread (the client's CPU), away from the balancer
        self.stats = {"client_hellos": 0, "offered_session": 0, "server_hellos": 0,
                      "resumed": 0, "hello_retry": 0, "versions": {}, "ciphers": {},
                      "groups": {}, "sni": {}, "drops": 0, "unparsed": 0}
        self._sids = {}
        prog, n = _bpf_tls_hellos()
        self._prog = ctypes.create_string_buffer(prog)
        fprog = struct.pack("HL", n, ctypes.addressof(self._prog))
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.sock.setsockopt(socket.SOL_SOCKET, 26, fprog)  # SO_ATTACH_FILTER
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self.sock.bind(("lo", 0x0003))  # ETH_P_ALL, bound after the filter is on
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})  # this thread only
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(262144)
            except socket.timeout:
                continue
            except OSError:
                break
            if addr[2] == 4:  # PACKET_OUTGOING: loopback shows every packet twice
                continue
            try:
                self._packet(data)
            except (IndexError, struct.error):
                self.stats["unparsed"] += 1

    def _packet(self, data):
        ip = 14
        ihl = (data[ip] & 0x0f) * 4
        tcp = ip + ihl
        sport, dport = struct.unpack_from("!HH", data, tcp)
        pay = tcp + (data[tcp + 12] >> 4) * 4
        body = data[pay + 9:]  # record header (5) + handshake header (4)
        st = self.stats
        if data[pay + 5] == 1 and dport == self.port:
            st["client_hellos"] += 1
            sid = body[35:35 + body[34]]
            pos = 35 + body[34]
            pos += 2 + struct.unpack_from("!H", body, pos)[0]  # cipher suites
            pos += 1 + body[pos]  # compression methods
            exts = _extensions(body, pos)
            if 41 in exts or exts.get(35):
                st["offered_session"] += 1
            sni = exts.get(0)  # server_name: list length (2), type (1), length (2), name
            name = sni[5:5 + struct.unpack_from("!H", sni, 3)[0]].decode("ascii", "replace") \
                if sni and len(sni) >= 5 else "(none)"
            st["sni"][name] = st["sni"].get(name, 0) + 1
            self._sids[sport] = sid
        elif data[pay + 5] == 2 and sport == self.port:
            st["server_hellos"] += 1
            legacy = struct.unpack_from("!H", body, 0)[0]
            random = body[2:34]
            sid = body[35:35 + body[34]]
            pos = 35 + body[34]
            cipher = struct.unpack_from("!H", body, pos)[0]
            exts = _extensions(body, pos + 3)
            client_sid = self._sids.pop(dport, None)
            if random == HRR_RANDOM:
                st["hello_retry"] += 1
                return
            version = struct.unpack_from("!H", exts[43])[0] if 43 in exts else legacy
            if version == 0x0304:
                resumed = 41 in exts
                group = struct.unpack_from("!H", exts[51])[0] if 51 in exts else None
                gname = TLS_GROUPS.get(group, f"0x{group:04x}") if group is not None else \
                    "none (PSK only)"
            else:
                resumed = bool(sid) and sid == client_sid
                gname = "(TLS 1.2: in ServerKeyExchange)"
            st["resumed"] += resumed
            for key, val in (("versions", TLS_VERSIONS.get(version, f"0x{version:04x}")),
                             ("ciphers", TLS_CIPHERS.get(cipher, f"0x{cipher:04x}")),
                             ("groups", gname)):
                st[key][val] = st[key].get(val, 0) + 1

    def stop(self):
        time.sleep(0.2)  # the last packets
        self._stop.set()
        self._thread.join(2)
        try:
            packets, drops = struct.unpack("II", self.sock.getsockopt(263, 6, 8))
            self.stats["drops"] = drops  # PACKET_STATISTICS
        except OSError:
            pass
        self.sock.close()
        return self.stats


def tls_negotiated(stats):
    """'TLSv1.3 TLS_AES_256_GCM_SHA384 X25519' (the most frequent of each)."""
    parts = []
    for key in ("versions", "ciphers", "groups"):
        d = stats.get(key) or {}
        if d:
            top = max(d, key=d.get)
            parts.append(top + (f" (+{sum(d.values()) - d[top]} other)"
                                if sum(d.values()) != d[top] else ""))
    return " ".join(parts) or "-"


def tls_verify(sc, stats, requests):
    """What the capture says about the scenario's premise; (ok, sentence)."""
    ch, sh, res = stats["client_hellos"], stats["server_hellos"], stats["resumed"]
    per_req = ch / max(requests, 1)
    problems = []
    if stats["drops"]:
        problems.append(f"the capture dropped {stats['drops']} packets")
    if sc.handshakes:
        # wrk stops with its connections' requests in flight: up to that many more hellos
        if not requests <= ch <= requests + 2 * sc.connections + 5:
            problems.append(f"{ch} ClientHellos for {requests} requests: not one new TLS "
                            f"connection per request")
        if sc.resume:
            # the first handshake of each client connection is full, every later one offers
            # the previous session and must be resumed
            if res != stats["offered_session"] or sh - res > sc.connections + 5:
                problems.append(f"{stats['offered_session']} ClientHellos offered a session, "
                                f"{res} of {sh} handshakes resumed: not every reconnect "
                                f"resumed")
        elif res or stats["offered_session"]:
            problems.append(f"{stats['offered_session']} ClientHellos offered a session and "
                            f"{res} handshakes were resumed: not all full handshakes")
    elif ch > 2 * sc.connections + 5:
        problems.append(f"{ch} ClientHellos for {sc.connections} keep-alive connections: "
                        f"connections were not kept")
    text = (f"{requests:,} requests, {ch:,} ClientHellos ({per_req:.3f} per request), "
            f"{stats['offered_session']:,} offering a session, {sh:,} ServerHellos, "
            f"{res:,} resumed ({100.0 * res / max(sh, 1):.1f}%), "
            f"{stats['hello_retry']} HelloRetryRequests; SNI "
            f"{', '.join(f'{k} ({v:,})' for k, v in stats.get('sni', {}).items()) or '-'}; "
            f"{tls_negotiated(stats)}")
    if problems:
        text += "; **" + "; ".join(problems) + "**"
    return not problems, text


# --------------------------------------------------------------------------------------------
# starting things


class Tools:
    def __init__(self, binary, alloc_binary):
        self.binary = binary
        self.alloc_binary = alloc_binary
        self.nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.wrk = shutil.which("wrk")
        self.taskset = shutil.which("taskset")
        self.perf = shutil.which("perf")
        # only for the TLS / HTTP/2 scenarios (Tools.require)
        self.openssl = shutil.which("openssl")
        self.h2load = shutil.which("h2load")
        self.cc = shutil.which("cc") or shutil.which("gcc")
        self.oha = find_oha()  # only for fixed-rate-1t
        self.certs = {}  # make_certs, when a TLS scenario is selected
        self.wrk_shim = None  # build_wrk_shim, when a TLS scenario loaded by wrk is selected
        missing = [n for n, p in [("nginx", self.nginx), ("haproxy", self.haproxy),
                                  ("wrk", self.wrk), ("taskset", self.taskset)]
                   if not p or not os.path.exists(p)]
        if missing:
            raise BenchError(f"missing tools: {', '.join(missing)} (make bench installs them)")
        if not os.access(binary, os.X_OK):
            raise BenchError(f"{binary} is not an executable (build it: cargo build --release "
                             f"--bin switchyard)")
        self.versions = {
            "switchyard": run_text([binary, "--version"]).strip(),
            "nginx": run_text([self.nginx, "-v"]).strip().replace("nginx version: ", ""),
            "haproxy": first_match(r"HAProxy version (\S+)", run_text([self.haproxy, "-v"])),
            "wrk": first_match(r"wrk (\S+)", run_text([self.wrk, "-v"])),
        }
        if self.h2load:
            self.versions["h2load"] = first_match(r"h2load (\S+)",
                                                  run_text([self.h2load, "--version"]))
        if self.openssl:
            self.versions["openssl"] = run_text([self.openssl, "version"]).strip()
        if self.oha:
            self.versions["oha"] = first_match(r"oha (\S+)", run_text([self.oha, "--version"]))
        m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", self.versions["nginx"])
        self.nginx_has_e = bool(m) and tuple(map(int, m.groups())) >= (1, 19, 5)

    def require(self, scenarios):
        """The tools the selected scenarios need beyond nginx, HAProxy, wrk and taskset."""
        need = set()
        for sc in scenarios:
            if sc.tls:
                need.add("openssl")
            if sc.tls and sc.client == "wrk":
                need.add("cc")  # builds the TLS shim for wrk
            if sc.client == "h2load":
                need.add("h2load")
            if sc.client == "oha":
                need.add("oha")
        missing = sorted(n for n in need if not getattr(self, n))
        if missing:
            raise BenchError(f"missing tools for the TLS/HTTP/2/fixed-rate scenarios: "
                             f"{', '.join(missing)} (make bench-deps installs them)")

    def pin(self, pinned, cpu):
        return [self.taskset, "-c", str(cpu)] if pinned else []

    def nginx_cmd(self, prefix, conf, errlog):
        cmd = [self.nginx, "-p", prefix, "-c", conf]
        return cmd + (["-e", errlog] if self.nginx_has_e else [])


def find_oha():
    """oha on PATH, else where `cargo install` (make bench-deps) puts it."""
    cargo_bin = os.path.join(os.environ.get("CARGO_HOME") or os.path.expanduser("~/.cargo"),
                             "bin", "oha")
    return shutil.which("oha") or (cargo_bin if os.access(cargo_bin, os.X_OK) else None)


def first_match(pattern, text):
    m = re.search(pattern, text)
    return m.group(1) if m else text.strip().splitlines()[0] if text.strip() else "?"


def run_text(cmd):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return r.stdout


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def serves(system, sc):
    """Whether `system` runs scenario `sc`: the reference systems proxy plain HTTP/1.1 with
    round robin over one pool and have no access log, routes or other algorithms; the
    allocation count is Switchyard's alone."""
    if system not in REFS:
        return True
    return not (sc.tls or sc.h2 or sc.access_log or sc.routes or sc.algorithm != "rr" or
                sc.kind == "alloc")


def systems_for(sc, args):
    return [s for s in args.systems if serves(s, sc)]


def check_refs(tools, args):
    """The reference binaries given on the command line (tools.refs), or BenchError."""
    tools.refs = {s: os.path.abspath(args.refs[s]) for s in REFS if s in args.systems}
    for system, path in tools.refs.items():
        if not os.access(path, os.X_OK):
            raise BenchError(f"{path} ({LABEL[system]}) is not an executable (build it: "
                             f"cargo build --release -p switchyard-bench-refs)")
    if tools.refs:
        try:
            with open(os.path.join(REPO, "Cargo.lock")) as f:
                lock = f.read()
            version = re.search(r'^name = "pingora-proxy"\nversion = "([^"]+)"', lock, re.M)
        except OSError:
            version = None
        tools.versions["pingora"] = (f"{version.group(1) if version else '?'} (the bare "
                                     f"references: crates/switchyard-bench-refs)")


def ref_cmd(tools, sc, layout, system):
    """A reference system's command line: the scenario's threads and backends."""
    cmd = [tools.refs[system], "--listen", f"127.0.0.1:{layout.lb_port[system]}",
           "--threads", str(sc.threads)]
    for port in layout.backend_ports[:sc.backends]:
        cmd += ["--backend", f"127.0.0.1:{port}"]
    return cmd


class Balancer:
    """A running balancer: the process and the PIDs to measure."""

    def __init__(self, system, proc, port, tls=None):
        self.system = system
        self.proc = proc
        self.port = port
        self.tls = tls  # client ssl.SSLContext for its TLS listener, or None

    def cpu_pids(self):
        # nginx: master and workers (the master idles); the others are one process.
        return [self.proc.pid] + (self.proc.children() if self.system == "nginx" else [])

    def rss_pids(self):
        return self.proc.children() if self.system == "nginx" else [self.proc.pid]


def start_backend(tools, work, sc, layout):
    n = 100 if sc.backends == 100 else max(sc.backends, 1)
    d = os.path.join(work, "backend")
    os.makedirs(d, exist_ok=True)
    conf = write(os.path.join(work, f"backend-{sc.name}.conf"), backend_nginx_conf(work, layout, n))
    cmd = tools.pin(sc.pinned, 1) + tools.nginx_cmd(d + "/", conf, f"{work}/backend-error.log")
    proc = Proc(f"backend-{sc.name}", cmd, work)
    wait_ready(proc, layout.backend_ports[0], "/")
    wait_ready(proc, layout.stub_port, "/status")
    return proc


def start_balancer(tools, work, sc, layout, system, binary=None, tag=""):
    port = layout.lb_port[system]
    name = f"{system}-{sc.name}{tag}"
    pin = tools.pin(sc.pinned, 0)
    env = dict(os.environ)
    cert = tools.certs.get(sc.tls) if sc.tls else None
    tls = client_tls_context(cert["ca"]) if cert else None
    if system == "switchyard":
        conf = write(os.path.join(work, f"{name}.yaml"),
                     switchyard_conf(work, sc, layout, cert))
        env["RUST_LOG"] = "warn"
        cmd = pin + [binary or tools.binary, "run", "--config", conf]
    elif system == "nginx":
        d = os.path.join(work, name)
        os.makedirs(d, exist_ok=True)
        conf = write(os.path.join(work, f"{name}.conf"),
                     nginx_lb_conf(work, sc, layout, name, cert))
        cmd = pin + tools.nginx_cmd(d + "/", conf, f"{work}/{name}-error.log")
    elif system in REFS:
        cmd = pin + ref_cmd(tools, sc, layout, system)
    else:
        conf = write(os.path.join(work, f"{name}.cfg"), haproxy_conf(work, sc, layout, cert))
        cmd = pin + [tools.haproxy, "-db", "-f", conf]
    proc = Proc(name, cmd, work, env=env)
    wait_ready(proc, port, sc.path, tls=tls)
    if system == "nginx":
        deadline = time.monotonic() + 10
        while len(proc.children()) < sc.threads and time.monotonic() < deadline:
            time.sleep(0.05)
        if len(proc.children()) != sc.threads:
            raise BenchError(f"nginx should have {sc.threads} worker(s), has "
                             f"{proc.children()}")
    return Balancer(system, proc, port, tls), cmd


def sanity_check(bal, sc):
    """Right body through one keep-alive connection; how many backends answer 200 requests."""
    conn = HttpConn(bal.port, tls=bal.tls)
    seen = set()
    try:
        for _ in range(200):
            status, headers, body = conn.get(sc.path)
            if status != 200:
                raise BenchError(f"{bal.system}: {sc.path} answered {status}: {body[:200]!r}")
            want_ok = len(body) == BODY_16K if sc.big else body == b"ok\n"
            if not want_ok:
                raise BenchError(f"{bal.system}: unexpected body for {sc.path}: "
                                 f"{len(body)} bytes, {body[:60]!r}")
            seen.add(headers.get("x-port"))
    finally:
        conn.close()
    return len(seen)


def stub_accepts(port):
    try:
        _, _, body = http_get_once(port, "/status")
        # "Active connections: 1 \nserver accepts handled requests\n 5 5 9 \n..."
        return int(body.decode().splitlines()[2].split()[0])
    except (OSError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------------------------------
# measurements


def run_wrk(tools, work, sc, port, duration, connections=CLIENT_CONNECTIONS):
    script = os.path.join(work, "report.lua")
    if not os.path.exists(script):
        write(script, WRK_SCRIPT)
    cmd = tools.pin(sc.pinned, 1) + [tools.wrk, "-t1", f"-c{connections}", f"-d{duration}s",
                                     "--latency", "-s", script]
    if sc.close:
        cmd += ["-H", "Connection: close"]
    cmd.append(f"{'https' if sc.tls else 'http'}://127.0.0.1:{port}{sc.path}")
    if sc.tls:  # see WRK_SHIM_C
        cmd = ["env", f"LD_PRELOAD={tools.wrk_shim}", f"WRK_SNI={TLS_NAME}"] + \
            (["WRK_NO_RESUME=1"] if sc.handshakes and not sc.resume else []) + cmd
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=duration + 60)
    m = re.search(r"^BENCH requests=(\d+) duration_us=(\d+) bytes=(\d+) connect=(\d+) "
                  r"read=(\d+) write=(\d+) status=(\d+) timeout=(\d+)$", r.stdout, re.M)
    if r.returncode != 0 or not m:
        raise BenchError(f"wrk failed (exit {r.returncode}): {' '.join(cmd)}\n{r.stdout}")
    requests, dur_us, nbytes, c, rd, w, st, to = map(int, m.groups())
    lat = {k: int(v) for k, v in re.findall(r"^BENCH_LAT (\S+) (\d+)$", r.stdout, re.M)}
    errors = {"connect": c, "read": rd, "write": w, "status": st, "timeout": to}
    return {
        "requests": requests,
        "duration_s": dur_us / 1e6,
        "rps": requests / (dur_us / 1e6) if dur_us else 0.0,
        "bytes": nbytes,
        "p50_us": lat.get("50"), "p75_us": lat.get("75"), "p90_us": lat.get("90"),
        "p99_us": lat.get("99"), "p999_us": lat.get("99.9"), "max_us": lat.get("max"),
        "errors": errors,
        "error_total": sum(errors.values()),
        "wrk_output": r.stdout,
    }, cmd


def percentile(sorted_values, p):
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def run_h2load(tools, work, sc, port, duration):
    """h2load -c H2_CLIENTS -m H2_STREAMS for `duration` s over TLS with ALPN h2; latency
    percentiles from its per-request log. Returns what run_wrk returns."""
    log = os.path.join(work, "h2load-requests.log")
    cmd = tools.pin(sc.pinned, 1) + [tools.h2load, "-t1", f"-c{sc.connections}",
                                     f"-m{H2_STREAMS}", "-D", str(duration),
                                     f"--log-file={log}",
                                     f"https://127.0.0.1:{port}{sc.path}"]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=duration + 60)
    out = r.stdout
    fin = re.search(r"^finished in ([\d.]+)(us|ms|s),", out, re.M)
    req = re.search(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                    r"(\d+) failed, (\d+) errored, (\d+) timeout", out, re.M)
    codes = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out, re.M)
    if r.returncode != 0 or not (fin and req and codes):
        raise BenchError(f"h2load failed (exit {r.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    secs = float(fin.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[fin.group(2)]
    _, _, done, ok, failed, errored, timeout = map(int, req.groups())
    c2, c3, c4, c5 = map(int, codes.groups())
    lat = []
    try:
        with open(log) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3:
                    lat.append(int(parts[2]))
    except OSError:
        pass
    lat.sort()
    # h2load's `failed` holds the errored and timed-out requests and the 4xx/5xx answers
    errors = {"failed": failed, "errored": errored, "timeout": timeout, "3xx": c3,
              "4xx": c4, "5xx": c5}
    proto = re.search(r"^Application protocol: (\S+)", out, re.M)
    return {
        "requests": c2,
        "duration_s": secs,
        "rps": c2 / secs if secs else 0.0,
        "bytes": None,
        "p50_us": percentile(lat, 50), "p75_us": percentile(lat, 75),
        "p90_us": percentile(lat, 90), "p99_us": percentile(lat, 99),
        "p999_us": percentile(lat, 99.9), "max_us": lat[-1] if lat else None,
        "errors": errors,
        "error_total": failed + c3,
        "alpn": proto.group(1) if proto else None,
        "h2load_tls": " ".join(m.group(1) for m in re.finditer(
            r"^(?:TLS Protocol|Cipher|Server Temp Key): (.+)$", out, re.M)),
        "wrk_output": out,
    }, cmd


def run_oha(tools, work, sc, port, duration):
    """oha at a fixed rate (sc.rate req/s) for `duration` s: an open-loop load, every
    request's latency counted from when it was due (`--latency-correction`), so a slow answer
    cannot hold back the requests after it (see NOTES). One tokio thread (`--worker-threads
    1`: it is pinned to one CPU with the backend); `-w` waits for the requests in flight at
    the deadline instead of counting them as errors. Returns what run_wrk returns."""
    out = os.path.join(work, "oha.json")
    cmd = tools.pin(sc.pinned, 1) + [tools.oha, "--no-tui", "--output-format", "json",
                                     "-o", out, "-q", str(sc.rate), "-z", f"{duration}s",
                                     "--latency-correction", "-w", "-c", str(sc.connections),
                                     "--worker-threads", "1",
                                     f"http://127.0.0.1:{port}{sc.path}"]
    if os.path.exists(out):
        os.unlink(out)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=duration + 60)
    try:
        with open(out) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise BenchError(f"oha failed (exit {r.returncode}, {e}): {' '.join(cmd)}\n"
                         f"{r.stdout[-3000:]}")
    if r.returncode != 0:
        raise BenchError(f"oha failed (exit {r.returncode}): {' '.join(cmd)}\n{r.stdout[-3000:]}")
    secs = data["summary"]["total"]
    codes = {int(k): v for k, v in data.get("statusCodeDistribution", {}).items()}
    requests = sum(codes.values())
    pct = data.get("latencyPercentiles", {})

    def us(key):
        v = pct.get(key)
        return None if v is None else v * 1e6  # oha reports seconds; NaN without requests

    errors = {"client": sum(data.get("errorDistribution", {}).values()),
              "non_2xx": sum(v for k, v in codes.items() if not 200 <= k < 300)}
    return {
        "requests": requests,
        "duration_s": secs,
        "rps": requests / secs if secs else 0.0,
        "target_rps": sc.rate,
        "bytes": data["summary"].get("totalData"),
        "p50_us": us("p50"), "p75_us": us("p75"), "p90_us": us("p90"), "p99_us": us("p99"),
        "p999_us": us("p99.9"), "p9999_us": us("p99.99"),
        "max_us": data["summary"]["slowest"] * 1e6 if requests else None,
        "errors": errors,
        "error_total": sum(errors.values()),
        "error_detail": data.get("errorDistribution", {}),
        "wrk_output": r.stdout,
    }, cmd


def run_load(tools, work, sc, port, duration):
    if sc.client == "h2load":
        return run_h2load(tools, work, sc, port, duration)
    if sc.client == "oha":
        return run_oha(tools, work, sc, port, duration)
    return run_wrk(tools, work, sc, port, duration, sc.connections)


def worker_ticks(bal):
    """CPU ticks per worker of a balancer: Switchyard's proxy threads (one per worker, each
    accepting on its own SO_REUSEPORT socket), nginx's worker processes, HAProxy's threads.
    None for the bare references (Pingora's work-stealing runtime has no fixed workers)."""
    pid = bal.proc.pid
    if bal.system == "nginx":
        paths = [f"/proc/{child}/stat" for child in bal.proc.children()]
    elif bal.system in ("switchyard", "haproxy"):
        try:
            paths = [f"/proc/{pid}/task/{tid}/stat" for tid in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            return None
    else:
        return None
    out = {}
    for path in paths:
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        if bal.system == "switchyard" and not comm.startswith("proxy "):
            continue
        fields = text[text.rindex(")") + 2:].split()
        out[path] = int(fields[11]) + int(fields[12])
    return out


def busiest_worker_share(before, after):
    """The busiest worker's share of all workers' CPU between two `worker_ticks` readings
    (1/N is an even spread), or None."""
    if not before or not after:
        return None
    deltas = [after[k] - before.get(k, 0) for k in after]
    total = sum(deltas)
    return max(deltas) / total if total > 0 and len(deltas) > 1 else None


def measure(tools, work, sc, bal, layout, duration):
    clk = os.sysconf("SC_CLK_TCK")
    pids = bal.cpu_pids()
    acc0 = stub_accepts(layout.stub_port)
    # Handshake scenarios count the handshakes themselves (ServerHellos on the wire): the
    # connections wrk leaves in flight at its end had their handshake (the CPU is in the
    # figure) but no completed request, which at a few hundred handshakes/s is several %.
    cap = None
    if sc.handshakes:
        try:
            cap = TlsCapture(bal.port, cpu=1 if sc.pinned else None)
        except OSError:  # not root: per completed request instead (the warm-up says so)
            cap = None
    try:
        w0 = worker_ticks(bal) if sc.threads > 1 else None
        u0, s0 = cpu_ticks(pids)
        res, cmd = run_load(tools, work, sc, bal.port, duration)
        u1, s1 = cpu_ticks(pids)
        res["busiest_worker"] = busiest_worker_share(w0, worker_ticks(bal) if w0 else None)
    finally:
        stats = cap.stop() if cap else None
    acc1 = stub_accepts(layout.stub_port)
    n = max(res["requests"], 1)
    res["cpu_per_request_us"] = ((u1 - u0) + (s1 - s0)) / clk * 1e6 / n
    if stats is not None:
        res["tls_stats"] = stats
        res["tls_ok"], res["tls_text"] = tls_verify(sc, stats, res["requests"])
        res["handshakes"] = stats["server_hellos"]
        res["hs_rate"] = stats["server_hellos"] / max(res["duration_s"], 1e-9)
        n = max(stats["server_hellos"], 1)
    res["user_us"] = (u1 - u0) / clk * 1e6 / n
    res["sys_us"] = (s1 - s0) / clk * 1e6 / n
    res["cpu_us"] = res["user_us"] + res["sys_us"]
    # CPUs the balancer kept busy (1.0 per thread: it was the bottleneck)
    res["cpu_load"] = ((u1 - u0) + (s1 - s0)) / clk / max(res["duration_s"], 1e-9)
    # backend connections opened per 1000 proxied requests (-1: the stub_status request itself)
    res["backend_conns_per_1k"] = (
        (acc1 - acc0 - 1) * 1000.0 / n if acc0 is not None and acc1 is not None else None)
    return res, cmd


def perf_syscalls(tools, work, sc, bal, duration):
    """raw_syscalls:sys_enter of the balancer's processes over one wrk run, per request."""
    if not tools.perf:
        return None, "perf not installed"
    pids = ",".join(str(p) for p in bal.cpu_pids())
    out = os.path.join(work, f"perf-{bal.system}.csv")
    cmd = [tools.perf, "stat", "-x", ",", "-o", out, "-e", "raw_syscalls:sys_enter",
           "-p", pids, "--", "sleep", str(duration + 1.5)]
    perf = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        if perf.poll() is not None:
            return None, f"perf exited: {perf.stderr.read().strip()[:300]}"
        res, _ = run_wrk(tools, work, sc, bal.port, duration)
        _, err = perf.communicate(timeout=30)
    finally:
        if perf.poll() is None:
            perf.kill()
            perf.wait()
    try:
        with open(out) as f:
            text = f.read()
    except OSError:
        return None, f"perf wrote nothing: {err.strip()[:300]}"
    for line in text.splitlines():
        if "raw_syscalls:sys_enter" in line:
            value = line.split(",")[0].strip()
            if value.isdigit():
                return {"syscalls": int(value), "requests": res["requests"],
                        "per_request": int(value) / max(res["requests"], 1),
                        "error_total": res["error_total"]}, None
            return None, f"perf could not count: {value}"
    return None, f"no count in perf output: {text.strip()[:300]}"


def counts_syscalls(sc):
    """The scenarios with a syscall count: those of the floor table (what the reference
    systems run over wrk), keepalive-1t among them."""
    return sc.kind == "wrk" and serves("pingora-proxy", sc)


def idle_connections(bal, sc):
    count = sc.idle
    conn = HttpConn(bal.port)
    for _ in range(200):  # warm: the backend connection, buffers, code paths
        conn.get(sc.path)
    conn.close()
    time.sleep(0.5)
    before = rss_kib(bal.rss_pids())
    socks = []
    bad = 0
    try:
        # One after the other, each asked right after its connect: a single backend
        # connection suffices, and no connection waits for the whole batch (10 000 take
        # longer to open than a balancer's header timeout).
        for _ in range(count):
            c = HttpConn(bal.port, timeout=10)
            socks.append(c)
            status, _, _ = c.get(sc.path)
            if status != 200:
                bad += 1
        time.sleep(1.0)
        after = rss_kib(bal.rss_pids())
        alive = 0
        for c in socks:  # still open and usable?
            status, _, _ = c.get(sc.path)
            alive += status == 200
        # the same again after closing them: does the memory come back and get reused?
        for c in socks:
            c.close()
        socks = []
        time.sleep(1.0)
        closed = rss_kib(bal.rss_pids())
        for _ in range(count):
            c = HttpConn(bal.port, timeout=10)
            socks.append(c)
            status, _, _ = c.get(sc.path)
            if status != 200:
                bad += 1
        time.sleep(1.0)
        second = rss_kib(bal.rss_pids())
    finally:
        for c in socks:
            c.close()
    return {"rss_before_kib": before, "rss_after_kib": after,
            "per_conn_kib": (after - before) / count, "non_200": bad,
            "still_answering": alive, "connections": count, "rss_closed_kib": closed,
            "rss_second_kib": second, "second_per_conn_kib": (second - before) / count}


def pending_heads(bal, sc, count=IDLE_CONNECTIONS):
    """RSS per connection that has sent part of a request head and then nothing: what a
    slowloris client costs until the header timeout."""
    conn = HttpConn(bal.port)
    for _ in range(200):
        conn.get(sc.path)
    conn.close()
    time.sleep(0.5)
    before = rss_kib(bal.rss_pids())
    partial = (f"GET {sc.path} HTTP/1.1\r\nHost: 127.0.0.1:{bal.port}\r\nX-Pad: ".encode()
               + b"p" * PENDING_HEAD_BYTES)
    socks = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", bal.port), timeout=10)
            s.sendall(partial)
            socks.append(s)
        time.sleep(1.0)
        after = rss_kib(bal.rss_pids())
        # Still held, not refused: a connection the balancer closed reads b"" at once.
        held = 0
        for s in socks:
            s.setblocking(False)
            try:
                held += s.recv(1) != b""
            except BlockingIOError:
                held += 1
            except OSError:
                pass
    finally:
        for s in socks:
            s.close()
    return {"rss_before_kib": before, "rss_after_kib": after,
            "per_conn_kib": (after - before) / count, "connections": count, "held": held}


def alloc_run(tools, work, sc, layout, requests, idx):
    bal, _ = start_balancer(tools, work, sc, layout, "switchyard", binary=tools.alloc_binary,
                            tag=f"-alloc{idx}")
    proc = bal.proc
    conn = HttpConn(bal.port)
    t0 = time.monotonic()
    try:
        for _ in range(requests):
            status, _, _ = conn.get(sc.path)
            if status != 200:
                raise BenchError(f"alloc run: status {status}")
    finally:
        conn.close()
    elapsed = time.monotonic() - t0
    time.sleep(0.3)
    proc.stop(timeout=15)
    m = re.search(r"^allocations: (\d+)\s*$", proc.stderr_tail(100000), re.M)
    return (int(m.group(1)) if m else None), elapsed


# --------------------------------------------------------------------------------------------
# scenarios


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(rounds):
    keys = ["rps", "p50_us", "p75_us", "p90_us", "p99_us", "p999_us", "user_us", "sys_us",
            "cpu_us", "cpu_load", "backend_conns_per_1k", "cpu_per_request_us", "hs_rate"]
    out = {k: median([r.get(k) for r in rounds]) for k in keys}
    out["error_total"] = sum(r["error_total"] for r in rounds)
    out["errors"] = {k: sum(r["errors"][k] for r in rounds) for k in rounds[0]["errors"]}
    return out


def run_wrk_scenario(tools, work, sc, layout, args, record):
    backend = start_backend(tools, work, sc, layout)
    balancers = {}
    result = {"scenario": sc.name, "title": sc.title, "kind": "wrk", "threads": sc.threads,
              "pinned": sc.pinned, "rounds": {s: [] for s in systems_for(sc, args)},
              "commands": {},
              "backends_seen": {}, "cert": sc.tls, "client": sc.client, "h2": sc.h2,
              "unit": ("resumed handshake" if sc.resume else "full handshake")
              if sc.handshakes else "request"}
    try:
        for system in systems_for(sc, args):
            try:
                bal, cmd = start_balancer(tools, work, sc, layout, system)
            except BenchError as e:
                # A balancer without TLS support yet (Switchyard's listener before it has
                # one): the scenario runs with the others and says so.
                if not sc.tls:
                    raise
                for p in [p for p in STARTED if p.name == f"{system}-{sc.name}"]:
                    p.stop()
                result.setdefault("not_run", {})[system] = str(e)[:800]
                print(f"  {sc.name} {LABEL[system]:<10} NOT RUN: {str(e)[:300]}", flush=True)
                continue
            balancers[system] = bal
            result["commands"][system] = show_cmd(cmd, work)
            result["backends_seen"][system] = sanity_check(bal, sc)
            if sc.tls:
                result.setdefault("tls", {})[system] = tls_warmup(tools, work, sc, bal)
            else:
                run_load(tools, work, sc, bal.port, WARMUP_SECONDS)
        ran = [s for s in systems_for(sc, args) if s in balancers]
        for s in list(result["rounds"]):
            if s not in balancers:
                del result["rounds"][s]
        for rnd in range(args.rounds):
            for system in ran:
                res, cmd = measure(tools, work, sc, balancers[system], layout, args.duration)
                result["commands"]["wrk"] = show_cmd(cmd, work).replace(
                    f":{balancers[system].port}/", ":$PORT/")
                res["round"] = rnd + 1
                result["rounds"][system].append(res)
                flag = f"  !!! {res['error_total']} ERRORS {res['errors']}" \
                    if res["error_total"] else ""
                if res.get("tls_ok") is False:
                    flag += f"  !!! TLS CHECK FAILED: {res['tls_text']}"
                unit = "hs" if sc.handshakes else "req"
                extra = (f", {res['handshakes']} handshakes, {res['cpu_per_request_us']:.1f} "
                         f"us/req" if sc.handshakes else "")
                print(f"  {sc.name:<19} round {rnd + 1} {LABEL[system]:<10} "
                      f"{res['rps']:>9.0f} req/s  p99 {fmt_ms(res['p99_us'])} ms  "
                      f"cpu {res['cpu_us']:6.1f} us/{unit} (user {res['user_us']:.1f}, "
                      f"kernel {res['sys_us']:.1f}{extra}){flag}", flush=True)
        result["median"] = {s: summarize(result["rounds"][s]) for s in ran}
        if counts_syscalls(sc) and not args.no_perf:
            result["syscalls"] = {}
            for system in ran:
                value, why = perf_syscalls(tools, work, sc, balancers[system],
                                           min(args.duration, 3))
                result["syscalls"][system] = value if value else {"skipped": why}
                print(f"  syscalls/request {LABEL[system]:<10} "
                      f"{value['per_request']:.2f}" if value else
                      f"  syscalls/request {LABEL[system]}: skipped ({why})", flush=True)
    finally:
        for bal in balancers.values():
            bal.proc.stop()
        backend.stop()
        record(result)
    return result


def fixed_rate(tools, work, sc, layout, args, results):
    """The rate of fixed-rate-1t, RATE_SHARE of nginx's maximum req/s on this machine in this
    run: keepalive-1t's nginx median when that ran before (same config: 1 pinned worker,
    keep-alive, tiny responses), else a short wrk calibration of nginx with that config.
    Returns (req/s, how it was found)."""
    ka = next((r for r in results if r["scenario"] == "keepalive-1t" and
               "nginx" in r.get("median", {})), None)
    if ka:
        peak = ka["median"]["nginx"]["rps"]
        return max(1, round(RATE_SHARE * peak)), (
            f"{RATE_SHARE:.0%} of nginx's keepalive-1t median in this run ({peak:,.0f} req/s)")
    backend = start_backend(tools, work, sc, layout)
    try:
        bal, _ = start_balancer(tools, work, sc, layout, "nginx", tag="-calibration")
        try:
            run_wrk(tools, work, sc, bal.port, WARMUP_SECONDS)
            seconds = min(args.duration, 3)
            res, _ = run_wrk(tools, work, sc, bal.port, seconds)
        finally:
            bal.proc.stop()
    finally:
        backend.stop()
    if res["error_total"] or not res["requests"]:
        raise BenchError(f"nginx's calibration run for {sc.name} failed: {res['errors']}")
    return max(1, round(RATE_SHARE * res["rps"])), (
        f"{RATE_SHARE:.0%} of nginx's req/s in a {seconds} s wrk calibration run with the "
        f"keepalive-1t config ({res['rps']:,.0f} req/s; keepalive-1t did not run before)")


def run_rate_scenario(tools, work, sc, layout, args, record, results):
    """fixed-rate-1t: run_wrk_scenario with oha at one rate for every system (fixed_rate),
    plus what only this scenario reports: the rate, the p99.99 and max, the p99 target."""
    sc.rate, source = fixed_rate(tools, work, sc, layout, args, results)
    print(f"  {sc.name}: {sc.rate:,} req/s for every system: {source}", flush=True)
    # How close the rate is to each system's own maximum (keepalive-1t, when it ran): the
    # queueing, and so the tail, grows steeply as a single thread nears saturation.
    ka = next((r for r in results if r["scenario"] == "keepalive-1t" and "median" in r), None)
    peaks = {s: v["rps"] for s, v in ka["median"].items()} if ka else {}

    def record_rate(res):
        res["rate"] = {"target_rps": sc.rate, "source": source, "share": RATE_SHARE,
                       "peaks": peaks}
        for system, rounds in res.get("rounds", {}).items():
            if system in res.get("median", {}):
                for key in ("p9999_us", "max_us"):
                    res["median"][system][key] = median([r.get(key) for r in rounds])
        res["rate"]["target"] = rate_target(res)
        record(res)

    result = run_wrk_scenario(tools, work, sc, layout, args, record_rate)
    t = result["rate"]["target"]
    if t:
        print(f"  {sc.name}: {t['text']}", flush=True)
    return result


def rate_target(res):
    """Switchyard's p99 against the better (lower) of nginx's and HAProxy's at the same rate:
    {"ratio", "met", "peer", "text"}, or None when one side did not run."""
    med = res.get("median", {})
    peers = [o for o in ("nginx", "haproxy") if med.get(o, {}).get("p99_us")]
    if not med.get("switchyard", {}).get("p99_us") or not peers:
        return None
    peer = min(peers, key=lambda o: med[o]["p99_us"])
    sy, best = med["switchyard"]["p99_us"], med[peer]["p99_us"]
    r = sy / best
    met = r <= RATE_P99_TARGET
    return {"ratio": r, "met": met, "peer": peer,
            "text": f"Target (p99 no worse than {RATE_P99_TARGET}x the better peer's): "
                    f"Switchyard {fmt_ms(sy)} ms, better peer {fmt_ms(best)} ms "
                    f"({LABEL[peer]}): ratio {r:.2f}, {'met' if met else 'missed'}."}


def tls_warmup(tools, work, sc, bal):
    """The warm-up run of a TLS scenario with its handshakes captured (TlsCapture): the same
    client and flags as the measured runs, so what they do is counted here."""
    try:
        cap = TlsCapture(bal.port)
    except OSError as e:
        run_load(tools, work, sc, bal.port, WARMUP_SECONDS)
        why = f"no handshake capture ({e}; AF_PACKET needs root)"
        print(f"  {sc.name} {LABEL[bal.system]:<10} TLS check skipped: {why}", flush=True)
        return {"skipped": why}
    try:
        res, _ = run_load(tools, work, sc, bal.port, WARMUP_SECONDS)
    finally:
        stats = cap.stop()
    ok, text = tls_verify(sc, stats, res["requests"])
    out = {"stats": stats, "requests": res["requests"], "ok": ok,
           "negotiated": tls_negotiated(stats),
           "resumed_share": stats["resumed"] / max(stats["server_hellos"], 1),
           # of the handshakes after each connection's first (only those can resume)
           "resumed_reconnects": stats["resumed"] / max(
               stats["server_hellos"] - min(sc.connections, stats["server_hellos"]), 1),
           "hellos_per_request": stats["client_hellos"] / max(res["requests"], 1)}
    if sc.client == "h2load":
        out["alpn"] = res.get("alpn")
        out["h2load_tls"] = res.get("h2load_tls")
        text += f"; h2load: application protocol {res.get('alpn')}, {res.get('h2load_tls')}"
        if res.get("alpn") != "h2":
            out["ok"] = False
            text += " **(not h2)**"
    out["text"] = text
    print(f"  {sc.name} {LABEL[bal.system]:<10} TLS check: {text}", flush=True)
    return out


def run_memory_scenario(tools, work, sc, layout, args, record, measure, describe):
    """One balancer at a time: `measure(bal, sc)` its memory, `describe(res)` it in a line."""
    backend = start_backend(tools, work, sc, layout)
    result = {"scenario": sc.name, "title": sc.title, "kind": sc.kind, "systems": {},
              "commands": {}}
    try:
        for system in systems_for(sc, args):
            bal, cmd = start_balancer(tools, work, sc, layout, system)
            result["commands"][system] = show_cmd(cmd, work)
            try:
                res = measure(bal, sc)
            finally:
                bal.proc.stop()
            result["systems"][system] = res
            print(f"  {sc.name} {LABEL[system]:<10} {describe(res)}", flush=True)
    finally:
        backend.stop()
        record(result)
    return result


def describe_idle(res):
    flag = "" if res["non_200"] == 0 and res["still_answering"] == res["connections"] \
        else f"  !!! {res['non_200']} non-200, {res['still_answering']} still answering"
    return (f"{res['per_conn_kib']:6.2f} KiB/conn  RSS {res['rss_before_kib']} -> "
            f"{res['rss_after_kib']} KiB; closed {res['rss_closed_kib']}, second {res['connections']} "
            f"{res['rss_second_kib']} KiB ({res['second_per_conn_kib']:.2f} KiB/conn){flag}")


def describe_pending(res):
    return (f"{res['per_conn_kib']:6.2f} KiB/conn  RSS {res['rss_before_kib']} -> "
            f"{res['rss_after_kib']} KiB; {res['held']}/{res['connections']} held")


def run_alloc_scenario(tools, work, sc, layout, args, record):
    result = {"scenario": sc.name, "title": sc.title, "kind": "alloc"}
    if not tools.alloc_binary or not os.access(tools.alloc_binary, os.X_OK):
        result["skipped"] = (f"{tools.alloc_binary} not found; build it with `cargo build "
                             f"--release --bin switchyard --features alloc-count` and copy it "
                             f"there (make bench does)")
        print(f"  allocs: SKIPPED: {result['skipped']}")
        record(result)
        return result
    backend = start_backend(tools, work, sc, layout)
    try:
        counts = []
        for idx, n in enumerate(ALLOC_REQUESTS):
            allocs, elapsed = alloc_run(tools, work, sc, layout, n, idx)
            if allocs is None:
                result["skipped"] = (f"{tools.alloc_binary} printed no `allocations: N` line "
                                     f"at exit (built without the alloc-count feature?)")
                print(f"  allocs: SKIPPED: {result['skipped']}")
                return result
            counts.append({"requests": n, "allocations": allocs, "seconds": elapsed})
        (r1, a1), (r2, a2) = [(c["requests"], c["allocations"]) for c in counts]
        result["runs"] = counts
        result["per_request"] = (a2 - a1) / (r2 - r1)
        print(f"  allocs: {result['per_request']:.2f} allocations per proxied request "
              f"({a1} after {r1} requests, {a2} after {r2})", flush=True)
    finally:
        backend.stop()
        record(result)
    return result


# --------------------------------------------------------------------------------------------
# output


def show_cmd(cmd, work):
    """A command as a shell line, the temp dir written as $TMP."""
    return shlex.join(cmd).replace(work, "$TMP").replace(REPO + "/", "")


def fmt_ms(us):
    return "-" if us is None else f"{us / 1000:.2f}"


def cell(med, system, key, spec):
    """A median figure for a table, "-" for a system that did not run the scenario."""
    return format(med[system][key], spec) if system in med else "-"


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def ratio(a, b):
    return None if not a or not b else a / b


def wrk_ratios(res):
    med = res["median"]
    out = {}
    sy = med.get("switchyard")
    for other in ("nginx", "haproxy"):
        o = med.get(other)
        if sy and o:
            out[other] = {"rps": ratio(sy["rps"], o["rps"]), "cpu": ratio(o["cpu_us"],
                                                                          sy["cpu_us"])}
    return out


def any_errors(results):
    bad = []
    for res in results:
        if res["kind"] == "wrk":
            for system, rounds in res["rounds"].items():
                for r in rounds:
                    if r["error_total"]:
                        bad.append(f"{res['scenario']} round {r['round']} {LABEL[system]}: "
                                   f"{r['error_total']} errors {r['errors']}")
            for system, rounds in res["rounds"].items():
                for r in rounds:
                    if r.get("tls_ok") is False:
                        bad.append(f"{res['scenario']} round {r['round']} {LABEL[system]}: "
                                   f"TLS check failed: {r['tls_text']}")
            for system, v in res.get("tls", {}).items():
                if "ok" in v and not v["ok"]:
                    bad.append(f"{res['scenario']} {LABEL[system]}: TLS check failed: "
                               f"{v['text']}")
            for system, v in res.get("syscalls", {}).items():
                if v.get("error_total"):
                    bad.append(f"{res['scenario']} perf run {LABEL[system]}: "
                               f"{v['error_total']} errors")
        elif res["kind"] == "idle":
            for system, v in res["systems"].items():
                if v["non_200"] or v["still_answering"] != v["connections"]:
                    bad.append(f"{res['scenario']} {LABEL[system]}: {v['non_200']} non-200 answers, "
                               f"{v['still_answering']}/{v['connections']} still answering")
    return bad


def print_summary(results, systems):
    print("\n" + "=" * 100)
    # each column as wide as its heading ("bare pingora-proxy cpu us/req" is 29 characters)
    rw = {s: max(18, len(LABEL[s]) + 8) for s in systems}
    cw = {s: max(22, len(LABEL[s]) + 13) for s in systems}
    head = f"{'scenario':<20}" + "".join(f"{LABEL[s] + ' req/s':>{rw[s]}}" for s in systems) + \
        "".join(f"{LABEL[s] + ' cpu us/req':>{cw[s]}}" for s in systems) + "  errors"
    print(head)
    for res in results:
        if res["kind"] != "wrk" or "median" not in res:
            continue
        med = res["median"]
        line = f"{res['scenario']:<20}"
        line += "".join(f"{med[s]['rps']:>{rw[s]}.0f}" if s in med else f"{'-':>{rw[s]}}"
                        for s in systems)
        line += "".join(f"{med[s]['cpu_us']:>{cw[s]}.1f}" if s in med else f"{'-':>{cw[s]}}"
                        for s in systems)
        errs = sum(med[s]["error_total"] for s in systems if s in med)
        line += f"  {'!!! ' + str(errs) if errs else 0}"
        print(line)
        for other, r in wrk_ratios(res).items():
            print(f"{'':<20}Switchyard/{LABEL[other]}: req/s x{r['rps']:.2f}, "
                  f"CPU per request x{r['cpu']:.2f} (>1: Switchyard better)")
    for res in results:
        if res["kind"] == "idle":
            for s, v in res["systems"].items():
                print(f"{res['scenario']:<13} {LABEL[s]:<10} {v['per_conn_kib']:.2f} KiB per idle "
                      f"connection, RSS {v['rss_after_kib']} KiB with {v['connections']} open")
        elif res["kind"] == "pending":
            for s, v in res["systems"].items():
                print(f"pending-heads {LABEL[s]:<10} {v['per_conn_kib']:.2f} KiB per pending "
                      f"head, RSS {v['rss_after_kib']} KiB with 1000 held")
        elif res["kind"] == "alloc":
            if "per_request" in res:
                print(f"allocs        Switchyard {res['per_request']:.2f} heap allocations per "
                      f"proxied request")
            else:
                print(f"allocs        skipped: {res.get('skipped')}")
    print("=" * 100)


def tls_libraries(tools):
    """Which TLS library each balancer runs: rustls and its crypto provider from Cargo.lock,
    the OpenSSL nginx and HAProxy run with (not the one they were built with)."""
    parts = []
    try:
        with open(os.path.join(REPO, "Cargo.lock")) as f:
            lock = f.read()
        vers = dict(re.findall(r'^name = "(rustls|ring|aws-lc-rs)"\nversion = "([^"]+)"', lock,
                               re.M))
        if "rustls" in vers:
            provider = ", ".join(f"{k} {v}" for k, v in vers.items() if k != "rustls")
            parts.append(f"Switchyard: rustls {vers['rustls']} ({provider or '?'})")
    except OSError:
        pass
    ng = re.search(r"running with (OpenSSL \S+)", run_text([tools.nginx, "-V"]))
    if not ng:
        ng = re.search(r"built with (OpenSSL \S+)", run_text([tools.nginx, "-V"]))
    ha = re.search(r"Running on OpenSSL version : (OpenSSL \S+)",
                   run_text([tools.haproxy, "-vv"]))
    parts.append(f"nginx: {ng.group(1) if ng else '?'}")
    parts.append(f"HAProxy: {ha.group(1) if ha else '?'}")
    return "; ".join(parts)


def machine_info(tools):
    model = cores = "?"
    for line in run_text(["lscpu"]).splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
        elif line.startswith("CPU(s):"):
            cores = line.split(":", 1)[1].strip()
    return {"cpu": model, "cpus": cores, "kernel": platform.release(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": tools.versions}


def tls_summary(tls_results, systems):
    """The TLS/HTTP/2 table: per handshake or request, against the better of the two peers."""
    L = ["### TLS and HTTP/2", ""]
    L.append("One unit is a full handshake (`tls-handshake-*`: every request a new TLS "
             "connection, no resumption), a resumed handshake (`tls-resume`) or a request "
             "(`tls-keepalive`, `h2-streams`); handshakes are counted as the ServerHellos the "
             "balancer sent during the run. CPU ratio vs the better peer = the lower of "
             "nginx's and HAProxy's CPU per unit / Switchyard's (>= 1.0: Switchyard uses no "
             "more CPU than the better of them). Negotiated = version, cipher suite and key "
             "exchange group in the ServerHellos captured during the warm-up run.")
    L.append("")
    head = "| scenario | unit | " + " | ".join(f"{LABEL[s]} units/s" for s in systems) + \
        " | " + " | ".join(f"{LABEL[s]} CPU µs/unit" for s in systems)
    peers = [o for o in ("nginx", "haproxy") if o in systems]
    if "switchyard" in systems and peers:
        head += " | CPU vs better peer"
    head += (f" | negotiated | resumed ({' / '.join(LABEL[s] for s in systems)}) | "
             f"checked |")
    L.append(head)
    L.append("|---" * (head.count("|") - 1) + "|")
    for res in tls_results:
        med = res["median"]
        row = f"| {res['scenario']} | {res['unit']} | "
        rate = "hs_rate" if res["unit"] != "request" else "rps"
        row += " | ".join(cell(med, s, rate, ",.0f") for s in systems) + " | "
        row += " | ".join(cell(med, s, "cpu_us", ".1f") for s in systems)
        if "switchyard" in systems and peers:
            ran = [o for o in peers if o in med]
            best = min(med[o]["cpu_us"] for o in ran) if ran else None
            r = ratio(best, med["switchyard"]["cpu_us"]) if "switchyard" in med else None
            row += f" | {fmt(r, '.2f')}"
        tls = res.get("tls", {})
        neg = {s: v.get("negotiated", "-") for s, v in tls.items()}
        row += " | " + (next(iter(neg.values())) if len(set(neg.values())) == 1 else
                        "; ".join(f"{LABEL[s]}: {n}" for s, n in neg.items()))
        if res["unit"] == "resumed handshake":
            row += " | " + ", ".join(f"{100 * v['resumed_reconnects']:.1f}% of reconnects"
                                     if "resumed_reconnects" in v else "-"
                                     for v in tls.values())
        elif res["unit"] == "full handshake":
            row += " | " + ", ".join(f"{v['stats']['resumed']} of {v['stats']['server_hellos']}"
                                     if "stats" in v else "-" for v in tls.values())
        else:
            row += " | -"
        ok = [v.get("ok") for v in tls.values()]
        row += " | " + ("yes" if ok and all(ok) else "**no**" if any(o is False for o in ok)
                        else "skipped") + " |"
        L.append(row)
    L.append("")
    for res in tls_results:
        for s, why in res.get("not_run", {}).items():
            L.append(f"**{LABEL[s]} did not run `{res['scenario']}`**: "
                     f"{why.splitlines()[0][:300]}")
            L.append("")
    target = next((r for r in tls_results if r["scenario"] == "tls-handshake-ecdsa"), None)
    if target and "switchyard" in target["median"] and \
            any(o in target["median"] for o in peers):
        med = target["median"]
        peers = [o for o in peers if o in med]
        best_peer = min(peers, key=lambda o: med[o]["cpu_us"])
        r = ratio(med[best_peer]["cpu_us"], med["switchyard"]["cpu_us"])
        L.append(f"Target (CPU per full ECDSA P-256 handshake no more than the better peer's): "
                 f"Switchyard {med['switchyard']['cpu_us']:.1f} µs, {LABEL[best_peer]} "
                 f"{med[best_peer]['cpu_us']:.1f} µs: ratio {fmt(r, '.2f')}, "
                 f"{'met' if r and r >= 1.0 else 'missed'}.")
        L.append("")
    return L


def rate_summary(rate_results, systems):
    """The fixed-rate scenarios' own small summary: the tail at the same rate, and the
    target on Switchyard's p99."""
    L = ["### Tail latency at a fixed rate", ""]
    L.append(f"Every system is sent the same rate, {RATE_SHARE:.0%} of nginx's maximum here, "
             f"by oha with `--latency-correction` (open loop: latency counted from when a "
             f"request was due; see Setup). Median over rounds, ms.")
    L.append("")
    head = "| scenario | rate req/s | " + " | ".join(f"{LABEL[s]} p50 / p99 / p99.9"
                                                      for s in systems) + " | p99 target |"
    L.append(head)
    L.append("|---" * (head.count("|") - 1) + "|")
    for res in rate_results:
        med = res["median"]
        t = res["rate"].get("target")
        row = f"| {res['scenario']} | {res['rate']['target_rps']:,} | "
        row += " | ".join(" / ".join(fmt_ms(med[s][k]) for k in ("p50_us", "p99_us", "p999_us"))
                          if s in med else "-" for s in systems)
        row += (f" | x{t['ratio']:.2f} of {LABEL[t['peer']]}: "
                f"{'met' if t['met'] else '**missed**'} |" if t else " | - |")
        L.append(row)
    L.append("")
    for res in rate_results:
        if res["rate"].get("target"):
            L.append(f"`{res['scenario']}`: {res['rate']['target']['text']}")
            L.append("")
    return L


def rate_details(res, systems):
    """The rate-specific part of a fixed-rate scenario's section: the rate asked for and
    achieved, the whole tail (p90 to max), per system and per round."""
    L = []
    rate = res["rate"]
    L.append(f"Rate: **{rate['target_rps']:,} req/s** for every system, {rate['source']}. "
             f"`oha -q {rate['target_rps']} -z <duration>s --latency-correction -w "
             f"-c{CLIENT_CONNECTIONS}` over keep-alive connections (see Setup and the commands "
             f"below).")
    L.append("")
    if rate.get("target"):
        L.append(rate["target"]["text"])
        L.append("")
    med = res["median"]
    peaks = rate.get("peaks", {})
    if peaks:
        L.append("*rate / own max* = the rate over the system's own keepalive-1t req/s in this "
                 "run: how near saturation the rate puts it (a single thread's queue, and so "
                 "its tail, grows steeply as that nears 100%).")
        L.append("")
    L.append("| system | req/s achieved | of the rate | rate / own max | p50 ms | p90 ms | "
             "p99 ms | p99.9 ms | p99.99 ms | max ms | errors / non-2xx | CPU µs/req | "
             "CPUs busy |")
    L.append("|---" * 13 + "|")
    for s in systems:
        if s not in med:
            continue
        v = med[s]
        errs = v["errors"]
        own = f"{rate['target_rps'] / peaks[s]:.0%}" if peaks.get(s) else "-"
        L.append(f"| {LABEL[s]} | {v['rps']:,.0f} | {v['rps'] / rate['target_rps']:.1%} | "
                 f"{own} | {fmt_ms(v['p50_us'])} | {fmt_ms(v['p90_us'])} | {fmt_ms(v['p99_us'])} | "
                 f"{fmt_ms(v['p999_us'])} | {fmt_ms(v.get('p9999_us'))} | "
                 f"{fmt_ms(v.get('max_us'))} | {errs.get('client', 0)} / "
                 f"{errs.get('non_2xx', 0)} | {v['cpu_us']:.1f} | {fmt(v['cpu_load'], '.2f')} |")
    L.append("")
    behind = [f"{LABEL[s]} round {r['round']} ({r['rps'] / rate['target_rps']:.0%})"
              for s in systems for r in res["rounds"].get(s, [])
              if r["rps"] < RATE_BEHIND * rate["target_rps"]]
    if behind:
        L.append(f"**Fewer requests than the rate** in {', '.join(behind)}: the requests "
                 f"still waiting in oha at the deadline are never sent. Either the system did "
                 f"not keep up (all {CLIENT_CONNECTIONS} connections waiting for answers, the "
                 f"rest queued in oha: see *rate / own max*), or oha itself was kept off its "
                 f"CPU (by the backend or other load on the machine) and its timer fell "
                 f"behind.")
        L.append("")
    L.append("<details><summary>per-round tail and rate</summary>")
    L.append("")
    L.append("| round | system | req/s achieved | p99 ms | p99.9 ms | p99.99 ms | max ms | "
             "errors |")
    L.append("|---" * 8 + "|")
    rounds = max((len(r) for r in res["rounds"].values()), default=0)
    for rnd in range(rounds):
        for s in systems:
            if rnd >= len(res["rounds"].get(s, [])):
                continue
            r = res["rounds"][s][rnd]
            detail = "; ".join(f"{k}: {v}" for k, v in r.get("error_detail", {}).items())
            L.append(f"| {r['round']} | {LABEL[s]} | {r['rps']:,.0f} | {fmt_ms(r['p99_us'])} | "
                     f"{fmt_ms(r['p999_us'])} | {fmt_ms(r.get('p9999_us'))} | "
                     f"{fmt_ms(r.get('max_us'))} | {r['error_total']}"
                     f"{' (' + detail + ')' if detail else ''} |")
    L.append("")
    L.append("</details>")
    L.append("")
    return L


# The floor table's steps: each system against the one below it, which has less of the stack.
FLOOR_STEPS = [("switchyard", "pingora-proxy", "our features"),
               ("pingora-proxy", "pingora-core", "pingora-proxy's machinery"),
               ("pingora-core", "nginx", "the framework's floor"),
               ("haproxy", "nginx", "")]
FLOOR_TARGET = 1.05  # issue 16: Switchyard within 5% of bare pingora-proxy in every scenario


def floor_section(wrk_results, systems):
    """The floor: per scenario the five systems' CPU per request (user, kernel) and syscalls
    per request, each with its ratio to the next system down the stack. Empty when no
    reference system ran."""
    rows = [r for r in wrk_results if any(s in r["median"] for s in REFS)]
    if not rows:
        return []
    L = ["### The floor: what our features cost over the framework, and what the framework "
         "costs over nginx", ""]
    L.append("Bare pingora-proxy = pingora-proxy with only `upstream_peer` (round robin); bare "
             "pingora-core = pingora-core's HTTP/1.1 session and connector with no "
             "pingora-proxy (both: `crates/switchyard-bench-refs`, same release profile and "
             "allocator as Switchyard; see Setup). Ratios are the row's system over the next "
             "one down the stack (>1: it costs more): Switchyard ÷ bare pingora-proxy = our "
             "features, bare pingora-proxy ÷ bare pingora-core = pingora-proxy's request "
             "machinery, bare pingora-core ÷ nginx = the framework's floor. CPU µs per request "
             "as in the per-scenario tables (medians over the rounds); syscalls per request "
             "from a separate `perf stat` run.")
    L.append("")
    L.append("| scenario | system | user µs/req | kernel µs/req | total µs/req | syscalls/req | "
             "step | total × | user × | kernel × | syscalls × |")
    L.append("|---" * 11 + "|")
    missed = []
    for res in rows:
        med = res["median"]
        sys_per = {s: v.get("per_request") for s, v in res.get("syscalls", {}).items()}
        for s in [s for s in systems if s in med]:
            v = med[s]
            row = (f"| {res['scenario']} | {LABEL[s]} | {v['user_us']:.1f} | {v['sys_us']:.1f} | "
                   f"{v['cpu_us']:.1f} | {fmt(sys_per.get(s), '.2f')} | ")
            step = next(((b, what) for a, b, what in FLOOR_STEPS if a == s), None)
            if step and step[0] in med:
                b = med[step[0]]
                row += (f"{step[1] + ': ' if step[1] else ''}÷ {LABEL[step[0]]} | "
                        f"{fmt(ratio(v['cpu_us'], b['cpu_us']), '.2f')} | "
                        f"{fmt(ratio(v['user_us'], b['user_us']), '.2f')} | "
                        f"{fmt(ratio(v['sys_us'], b['sys_us']), '.2f')} | "
                        f"{fmt(ratio(sys_per.get(s), sys_per.get(step[0])), '.2f')} |")
            else:
                row += "- | - | - | - | - |"
            L.append(row)
        if "switchyard" in med and "pingora-proxy" in med:
            r = ratio(med["switchyard"]["cpu_us"], med["pingora-proxy"]["cpu_us"])
            if r and r > FLOOR_TARGET:
                missed.append(f"{res['scenario']} ×{r:.2f}")
    L.append("")
    both = [r for r in rows if "switchyard" in r["median"] and "pingora-proxy" in r["median"]]
    if both:
        L.append(f"Target (Switchyard's total CPU per request within "
                 f"{100 * (FLOOR_TARGET - 1):.0f}% of bare pingora-proxy's in every scenario): "
                 + (f"missed in {', '.join(missed)}." if missed else "met in all "
                    f"{len(both)}."))
        L.append("")
    return L


# issue 16: Switchyard's CPU per request at 2 worker threads within this factor of 1 thread's,
# round by round, and its req/s at 2 threads not below the best round before shared-nothing
# workers (issue 15's run, docs/benchmarks.md of 2026-12-01 17:02).
THREADS_TARGET = 1.10
THREADS_RPS_BEFORE = 14139


def threads_target(wrk_results):
    """The shared-nothing workers' target line: keepalive-2t against keepalive-1t, per round."""
    by = {r["scenario"]: r for r in wrk_results}
    one, two = by.get("keepalive-1t"), by.get("keepalive-2t")
    if not one or not two:
        return []
    r1 = one["rounds"].get("switchyard", [])
    r2 = two["rounds"].get("switchyard", [])
    ratios = [b["cpu_us"] / a["cpu_us"] for a, b in zip(r1, r2) if a.get("cpu_us")]
    if not ratios:
        return []
    best = max(r["rps"] for r in r2)
    met = all(x <= THREADS_TARGET for x in ratios)
    return [f"Target (Switchyard's CPU per request at `keepalive-2t` within "
            f"{100 * (THREADS_TARGET - 1):.0f}% of `keepalive-1t`'s in every round): "
            + ", ".join(f"×{x:.2f}" for x in ratios) + f" by round, {'met' if met else 'missed'}"
            f"; req/s at 2 threads, best round {best:,.0f} against {THREADS_RPS_BEFORE:,} "
            f"before shared-nothing workers: {'met' if best >= THREADS_RPS_BEFORE else 'missed'}.",
            ""]


def markdown(results, meta, args, errors):
    systems = args.systems
    L = []
    L.append(f"Generated by `tests/bench/bench.py` on {meta['machine']['date']}; "
             f"{args.rounds} round(s) of {args.duration} s per system and scenario, systems "
             f"interleaved (round 1: {', '.join(LABEL[s] for s in systems)}; round 2: ...), "
             f"median over rounds.")
    L.append("")
    if errors:
        L.append("> **⚠ ERRORS: some requests failed during this run; the numbers below are "
                 "not trustworthy.**")
        L.append(">")
        for e in errors:
            L.append(f"> - {e}")
    else:
        L.append("No request failed in any run (wrk socket errors, non-2xx answers, idle "
                 "connection answers: all zero).")
    L.append("")
    m = meta["machine"]
    L.append("| machine | |")
    L.append("|---|---|")
    L.append(f"| CPU | {m['cpu']}, {m['cpus']} CPUs |")
    L.append(f"| kernel | {m['kernel']} |")
    for k in ("switchyard", "nginx", "haproxy", "wrk", "h2load", "oha", "openssl"):
        if k in m["versions"] or k in ("switchyard", "nginx", "haproxy", "wrk"):
            L.append(f"| {k} | {m['versions'].get(k, '?')} |")
    if meta.get("tls_libraries"):
        L.append(f"| TLS libraries | {meta['tls_libraries']} |")
    for kind, desc in meta.get("certificates", {}).items():
        L.append(f"| certificate `{kind}` | {desc}, self-signed, SAN DNS:{TLS_NAME}, "
                 f"IP:127.0.0.1 |")
    L.append("")
    L.append("![CPU per request and throughput ratios](benchmarks.png)")
    L.append("")

    wrk_results = [r for r in results if r["kind"] == "wrk" and "median" in r]
    if wrk_results:
        L.append("### Summary")
        L.append("")
        L.append("Ratios are Switchyard relative to the other system, >1 means Switchyard is "
                 "better: req/s ratio = Switchyard req/s / other req/s; CPU ratio = other CPU "
                 "per request / Switchyard CPU per request.")
        L.append("")
        head = "| scenario | " + " | ".join(f"{LABEL[s]} req/s" for s in systems) + " | " + \
            " | ".join(f"{LABEL[s]} CPU µs/req" for s in systems)
        ratios_cols = [o for o in ("nginx", "haproxy") if o in systems and "switchyard" in systems]
        for o in ratios_cols:
            head += f" | req/s vs {LABEL[o]} | CPU vs {LABEL[o]}"
        L.append(head + " | errors |")
        L.append("|---" * (1 + 2 * len(systems) + 2 * len(ratios_cols) + 1) + "|")
        for res in wrk_results:
            med = res["median"]
            row = f"| {res['scenario']} | " + " | ".join(cell(med, s, "rps", ",.0f")
                                                         for s in systems)
            row += " | " + " | ".join(cell(med, s, "cpu_us", ".1f") for s in systems)
            rat = wrk_ratios(res)
            for o in ratios_cols:
                row += (f" | {rat[o]['rps']:.2f} | {rat[o]['cpu']:.2f}" if o in rat
                        else " | - | -")
            errs = sum(med[s]["error_total"] for s in systems if s in med)
            row += f" | {'**' + str(errs) + '**' if errs else 0} |"
            L.append(row)
        L.append("")
        L += floor_section(wrk_results, systems)
        L += threads_target(wrk_results)
    tls_results = [r for r in wrk_results if r.get("cert")]
    if tls_results:
        L += tls_summary(tls_results, [s for s in systems if s not in REFS])
    rate_results = [r for r in wrk_results if r.get("rate")]
    if rate_results:
        L += rate_summary(rate_results, systems)

    for res in results:
        L.append(f"### `{res['scenario']}`: {res['title']}")
        L.append("")
        if res["kind"] == "wrk" and "median" in res:
            med = res["median"]
            pin = (f"balancer pinned to CPU 0 (`taskset -c 0`), {res['client']} and the "
                   f"backend to CPU 1"
                   if res["pinned"] else "nothing pinned: balancer, wrk and backend share "
                   "both CPUs")
            L.append(f"{res['threads']} worker thread(s)/process(es) per balancer; {pin}.")
            L.append("")
            if res.get("unit", "request") != "request":
                L.append(f"Every request is a new TLS connection with one {res['unit']} "
                         f"(checked below). The CPU figures in this section are per "
                         f"{res['unit']}: the balancer's CPU over the run divided by the "
                         f"ServerHellos it sent in that run (captured on `lo`), which counts "
                         f"the handshakes of the connections wrk leaves in flight at its end "
                         f"too; divided by the completed requests instead it is the *CPU "
                         f"µs/req* of the per-round table.")
                L.append("")
            elif res.get("h2"):
                L.append(f"`h2load -c{H2_CLIENTS} -m{H2_STREAMS}`: {H2_CLIENTS} TLS connections "
                         f"opened once, up to {H2_STREAMS} concurrent streams on each; latency "
                         f"percentiles from h2load's per-request log (`--log-file`).")
                L.append("")
            L.append("| system | req/s | p50 ms | p99 ms | p99.9 ms | CPU µs/req user | "
                     "kernel | total | CPUs busy | backend conns /1k req | errors |")
            L.append("|---|---|---|---|---|---|---|---|---|---|---|")
            for s in systems:
                if s not in med and s in REFS:
                    continue  # not a scenario the reference systems serve (serves())
                if s not in med:
                    why = res.get("not_run", {}).get(s, "not run")
                    L.append(f"| {LABEL[s]} | not run: {why.splitlines()[0][:200]} |" +
                             " |" * 9)
                    continue
                v = med[s]
                err = v["error_total"]
                err_s = f"**{err}** {v['errors']}" if err else "0"
                L.append(f"| {LABEL[s]} | {v['rps']:,.0f} | {fmt_ms(v['p50_us'])} | "
                         f"{fmt_ms(v['p99_us'])} | {fmt_ms(v['p999_us'])} | "
                         f"{v['user_us']:.1f} | {v['sys_us']:.1f} | {v['cpu_us']:.1f} | "
                         f"{fmt(v['cpu_load'], '.2f')} | "
                         f"{fmt(v['backend_conns_per_1k'], '.2f')} | {err_s} |")
            L.append("")
            if res.get("rate"):
                L += rate_details(res, systems)
            rat = wrk_ratios(res)
            if rat:
                L.append("Switchyard relative (>1: Switchyard better): " + "; ".join(
                    f"vs {LABEL[o]} req/s ×{r['rps']:.2f}, CPU/req ×{r['cpu']:.2f}"
                    for o, r in rat.items()) + ".")
                L.append("")
            tls = res.get("tls")
            if tls:
                L.append(f"TLS handshakes on the wire during the {WARMUP_SECONDS} s warm-up "
                         f"run (same client and flags as the measured runs; ClientHello and "
                         f"ServerHello records captured on `lo`, see Setup):")
                L.append("")
                for s, v in tls.items():
                    L.append(f"- {LABEL[s]}: " + (v["text"] if "text" in v else
                                                  f"skipped ({v.get('skipped')})"))
                L.append("")
            seen = res.get("backends_seen", {})
            if seen:
                L.append("Distinct backends answering 200 sequential requests (sanity check): " +
                         ", ".join(f"{LABEL[s]} {n}" for s, n in seen.items()) + ".")
                L.append("")
            spread = {s: [r.get("busiest_worker") for r in res["rounds"].get(s, [])]
                      for s in systems}
            spread = {s: v for s, v in spread.items() if v and all(x is not None for x in v)}
            if spread:
                L.append("Busiest worker's share of the workers' CPU, per round (50% is an "
                         "even spread over 2): " + "; ".join(
                             f"{LABEL[s]} " + ", ".join(f"{100 * x:.0f}%" for x in v)
                             for s, v in spread.items()) + ".")
                L.append("")
            sc = res.get("syscalls")
            if sc:
                L.append("Syscalls per request (`perf stat -e raw_syscalls:sys_enter` on the "
                         "balancer's processes over a separate wrk run): " + ", ".join(
                             f"{LABEL[s]} {v['per_request']:.2f}" if "per_request" in v
                             else f"{LABEL[s]} skipped ({v.get('skipped')})"
                             for s, v in sc.items()) + ".")
                L.append("")
            L.append("<details><summary>per-round numbers</summary>")
            L.append("")
            hs = res.get("unit", "request") != "request"
            u = "hs" if hs else "req"
            L.append("| round | system | req/s | p50 ms | p75 ms | p90 ms | p99 ms | p99.9 ms | "
                     f"user µs/{u} | kernel µs/{u} | total µs/{u} | " +
                     ("handshakes | CPU µs/req | handshake check | " if hs else "") + "errors |")
            L.append("|---" * (12 + 3 * hs) + "|")
            for rnd in range(args.rounds):
                for s in systems:
                    if rnd >= len(res["rounds"].get(s, [])):
                        continue
                    r = res["rounds"][s][rnd]
                    extra = ""
                    if hs:
                        check = "ok" if r.get("tls_ok") else \
                            "**failed**: " + r.get("tls_text", "")
                        extra = (f"{r.get('handshakes', 0):,} | "
                                 f"{fmt(r.get('cpu_per_request_us'))} | {check} | ")
                    L.append(f"| {r['round']} | {LABEL[s]} | {r['rps']:,.0f} | "
                             f"{fmt_ms(r['p50_us'])} | {fmt_ms(r['p75_us'])} | "
                             f"{fmt_ms(r['p90_us'])} | {fmt_ms(r['p99_us'])} | "
                             f"{fmt_ms(r['p999_us'])} | {r['user_us']:.1f} | "
                             f"{r['sys_us']:.1f} | {r['cpu_us']:.1f} | {extra}"
                             f"{r['error_total']} |")
            L.append("")
            L.append("</details>")
        elif res["kind"] == "idle":
            n = next(iter(res["systems"].values()), {}).get("connections", IDLE_CONNECTIONS)
            L.append(f"One worker thread, same config as `keepalive-1t`, balancer pinned to "
                     f"CPU 0. After 200 warm-up requests, RSS (`VmRSS`; nginx: its worker) is "
                     f"read, {n:,} client connections are opened, each sends one "
                     f"keep-alive GET and reads the answer (one after the other, so one "
                     f"backend connection suffices), and RSS is read again after 1 s. Then "
                     f"they are closed (RSS read after 1 s) and a second batch of "
                     f"{n:,} is opened the same way: its per-connection figure "
                     f"is against the first baseline, so it shows whether the memory of "
                     f"closed connections is reused.")
            L.append("")
            L.append(f"| system | KiB per idle connection | RSS before KiB | RSS with {n:,} "
                     f"open KiB | RSS after closing KiB | second {n:,}: RSS KiB | "
                     f"second {n:,}: KiB/conn | non-200 answers | still answering after 1 s |")
            L.append("|---|---|---|---|---|---|---|---|---|")
            for s, v in res["systems"].items():
                L.append(f"| {LABEL[s]} | {v['per_conn_kib']:.2f} | {v['rss_before_kib']:,} | "
                         f"{v['rss_after_kib']:,} | {v['rss_closed_kib']:,} | "
                         f"{v['rss_second_kib']:,} | {v['second_per_conn_kib']:.2f} | "
                         f"{v['non_200']} | {v['still_answering']}/{v['connections']} |")
        elif res["kind"] == "pending":
            L.append(f"Same config as `keepalive-1t`. After 200 warm-up requests, RSS is read, "
                     f"{IDLE_CONNECTIONS} client connections each send a request line, `Host` and "
                     f"a header of {PENDING_HEAD_BYTES} bytes without ending the head, and RSS is "
                     f"read again after 1 s (well inside every system's header timeout).")
            L.append("")
            L.append("| system | KiB per pending head | RSS before KiB | RSS with 1 000 held "
                     "KiB | connections still held |")
            L.append("|---|---|---|---|---|")
            for s, v in res["systems"].items():
                L.append(f"| {LABEL[s]} | {v['per_conn_kib']:.2f} | {v['rss_before_kib']:,} | "
                         f"{v['rss_after_kib']:,} | {v['held']}/{v['connections']} |")
        elif res["kind"] == "alloc":
            if "per_request" in res:
                (a, b) = res["runs"]
                L.append(f"`switchyard-alloc-count` (the `alloc-count` feature: a counting "
                         f"global allocator) with the `keepalive-1t` config; one process per "
                         f"run, one client connection sending exactly R requests one after "
                         f"the other, then SIGTERM and the `allocations: N` line it prints.")
                L.append("")
                L.append("| requests R | allocations N (process lifetime) |")
                L.append("|---|---|")
                L.append(f"| {a['requests']:,} | {a['allocations']:,} |")
                L.append(f"| {b['requests']:,} | {b['allocations']:,} |")
                L.append("")
                L.append(f"**{res['per_request']:.2f} heap allocations per proxied request** "
                         f"((N2 - N1) / (R2 - R1)).")
            else:
                L.append(f"Skipped: {res.get('skipped')}")
        L.append("")

    L.append("### Setup")
    L.append("")
    L.append(NOTES.strip())
    L.append("")
    L.append("<details><summary>commands and configs</summary>")
    L.append("")
    L.append("`$TMP` is the run's temp dir, `$PORT` the balancer's port.")
    L.append("")
    L.append("```sh")
    L.append("make bench   # or:")
    L.append(meta["invocation"])
    for res in results:
        cmds = res.get("commands", {})
        if cmds:
            L.append(f"# {res['scenario']}")
            for k, v in cmds.items():
                L.append(f"{v}  # {k}" if k != "wrk" else v)
    L.append("```")
    for name, text in meta.get("example_configs", {}).items():
        L.append("")
        L.append(f"`{name}`:")
        L.append("")
        L.append("```")
        L.append(text.rstrip())
        L.append("```")
    L.append("")
    L.append("</details>")
    return "\n".join(L)


NOTES = """
- **Backends**: one nginx process (`master_process off`, 1 worker, `access_log off`,
  `keepalive_requests 1000000`, `backlog=4096`) answering `return 200 "ok\\n"` (16 KiB
  scenario: a 16 KiB static file), on as many 127.0.0.1 ports as the scenario needs, plus an
  `X-Port` response header so the harness can check which backend answered.
- **Runs**: per scenario, each balancer is started once, checked (200 sequential requests
  through one connection: status 200 and the right body), warmed up by a 1 s wrk run, then
  measured in interleaved rounds; the median of each figure over the rounds is shown.
- **Load**: `wrk -t1 -c50 -d<duration>s --latency` with a Lua `done()` hook printing every
  percentile from wrk's histogram (p99.9 included); `new-conn` adds `-H "Connection: close"`
  so wrk opens a new connection per request. Errors = wrk's socket errors (connect, read,
  write, timeout) + non-2xx answers.
- **Fixed rate** (`fixed-rate-1t`): wrk is a closed loop: each of its connections sends its
  next request only when the answer to the previous one has arrived, so while the balancer
  stalls, the requests a real client population would have sent in the meantime are not
  sent, and a 5 ms stall shows up as one slow request instead of as every request that
  would have arrived during it (coordinated omission): wrk under-reports the tail, and the
  more the slower the system. oha with `-q RATE --latency-correction` is an open loop: a
  timer releases RATE requests per second whatever the answers do, a free one of its 50
  keep-alive connections (`-c50`) sends each, and each latency is counted from when the
  request was released, so the time spent waiting behind a slow answer counts. RATE is
  50% of nginx's keepalive-1t req/s in the same run (or of a short wrk calibration run of
  nginx with that config when keepalive-1t did not run first), the same for every system:
  well below saturation, what this scenario compares is latency under a moderate load, not
  throughput. At that rate and sub-millisecond answers only a few requests are in flight at
  a time (rate x latency), so 50 connections never make a request wait for a free one, and
  they keep the 50 open client connections of the other scenarios. oha runs one tokio
  thread (`--worker-threads 1`: it shares CPU 1 with the backend) and waits for the
  requests in flight at the deadline (`-w`; without it they count as errors). Two things
  from oha's source (1.16, `work_until_with_qps_latency_correction`) that apply to every
  system alike: its timer is tokio's (1 ms granularity), so the requests are released in
  bursts of RATE/1000 every millisecond, and the single-threaded balancer answers a burst
  one request after the other; and the clock of a request starts when the timer task
  wakes, not at its nominal time, so a delay of oha's own timer is not counted; and the
  requests still queued in oha at the deadline (a system that did not keep up: all 50
  connections waiting) are neither sent nor counted, so such a system's tail is a lower
  bound: its achieved req/s says so (a round under 95% of the rate is flagged), and *rate /
  own max* (the rate over its keepalive-1t req/s) says how near saturation the rate puts it.
  CPU per request as in the other scenarios, over the oha run; errors = oha's error
  distribution + non-2xx answers.
- **CPU per request**: utime and stime from `/proc/PID/stat` (fields 14 and 15) of the
  balancer before and after the wrk run (nginx: master + workers, the master is idle),
  divided by the requests wrk completed. Resolution is one clock tick (10 ms) per run.
- **Pinning**: 1-thread scenarios run the balancer under `taskset -c 0` and wrk plus the
  backend under `taskset -c 1`; `keepalive-2t` pins nothing (on a 2-CPU machine the balancer
  then competes with wrk and the backend).
- **Equivalent settings**: the same number of worker threads (Switchyard `server.threads`,
  nginx `worker_processes`, HAProxy `nbthread`). At 2 threads Switchyard runs one
  single-threaded worker per thread, each accepting on its own `SO_REUSEPORT` socket, as
  nginx's workers with `reuseport` would (nginx here shares one listening socket between its
  workers; HAProxy binds as its defaults do); the bare references run Pingora's default
  work-stealing runtime. The per-scenario text gives the busiest worker's share of the
  workers' CPU in each round; backend keep-alive everywhere (nginx
  `keepalive 64`, `keepalive_requests 1000000`, `proxy_http_version 1.1`,
  `proxy_set_header Connection ""`; HAProxy `http-reuse always`; Switchyard always reuses);
  client keep-alive without a request limit (nginx `keepalive_requests 1000000`); no access
  logs, no health checks. Switchyard always adds `X-Forwarded-For`, `X-Forwarded-Proto`,
  `X-Forwarded-Host` and keeps the client's `Host`, so nginx sets the same four headers
  (`$proxy_add_x_forwarded_for`, `$scheme`, `$host`, `Host $http_host`) and HAProxy uses
  `option forwardfor` plus two `http-request set-header` rules (it keeps `Host` by itself).
  Switchyard's per-request Prometheus metrics (counters and a latency histogram) cannot be
  turned off and are included; nginx and HAProxy keep only their built-in counters.
  Algorithms: round robin = Switchyard `round_robin` / nginx default / HAProxy
  `balance roundrobin`; least connections = `least_connections` / `least_conn` /
  `balance leastconn`; ip hash = `ip_hash` (ketama) / `ip_hash` / `balance source` with
  `hash-type consistent`. With a single client IP, ip hash sends everything to one backend
  in all three. nginx buffers proxied responses in memory (`proxy_buffering` default, 16 KiB
  fits), Switchyard and HAProxy stream.
- **The reference systems** (`crates/switchyard-bench-refs`, built by `make bench` with the
  workspace's release profile, fat LTO and one codegen unit, and mimalloc as Switchyard; used
  only here): *bare pingora-proxy* is pingora-proxy's `ProxyHttp` with only `new_ctx` and
  `upstream_peer` (Pingora's `LoadBalancer<RoundRobin>`, no health checks); *bare
  pingora-core* is a pingora-core `HttpServerApp` without pingora-proxy: read the head, take
  a pooled connection from pingora-core's HTTP connector (the one pingora-proxy uses), write
  the head, stream the request body and then the response body (not duplex), write the
  response head, give the upstream connection back to the pool, keep the client's. Both run
  the scenario's threads (`--threads`) and backends (`--backend`, round robin), and keep
  Pingora's defaults otherwise, where Switchyard sets: a 4 KiB listener read buffer (Pingora:
  64 KiB, which every idle connection keeps: `idle-1000` shows it), `max_retries` 3 (16; no
  request is retried here), its h2 server options (no h2 here) and its client limits
  (`server.clients`: keep-alive and header timeouts, a connection cap). They
  add no `X-Forwarded-*` headers, keep no metrics and have no routes: that is part of what
  the floor table calls our features. They run the plain-HTTP scenarios with round robin
  over one pool: `keepalive-1t`, `keepalive-2t`, `new-conn`, `16k`, `100-backends`,
  `shared-pool-2t`, `idle-1000` and `pending-heads`; not TLS, HTTP/2, the access log, routes,
  least connections, ip hash or the allocation count. Syscalls per request are counted in
  each of their wrk scenarios (a separate `perf stat` run per system).
- **100 routes**: Switchyard and HAProxy check rules in order (the request matches the last
  of 100); nginx picks the longest matching `location` prefix from a tree, so the number of
  locations barely matters to it.
- **CPUs busy**: the balancer's CPU time over the run's wall time; close to the number of
  worker threads means the balancer was the bottleneck, lower means wrk or the backend was
  (1-thread scenarios: they share CPU 1).
- **Backend conns /1k req**: connections the backend accepted (`stub_status`) per 1000
  proxied requests; ~0 means the balancer reuses backend connections. wrk stops with 50
  requests in flight, and a balancer that then drops those backend connections reopens them
  in the next run, which shows here as a small non-zero value.
- nginx's `keepalive N` is a per-worker LRU cache shared by all servers of an upstream: 64
  idle connections for 100 servers made nginx open a new backend connection for ~60% of the
  requests, so the configs use `keepalive max(64, 4 × servers)` (400 for `100-backends`).
- **TLS setup** (`tls-*`, `h2-streams`): one self-signed certificate per key type, made once
  per run in the temp dir with `openssl req -x509` (ECDSA P-256 or RSA 2048, SAN
  `DNS:bench.local`, `IP:127.0.0.1`), the same files for all three balancers (HAProxy gets
  them as one PEM). TLS 1.2 and 1.3 on in all three (nginx `ssl_protocols TLSv1.2 TLSv1.3`,
  HAProxy `ssl-min-ver TLSv1.2`, Switchyard `min_version: "1.2"`); every client here
  negotiates TLS 1.3. Resumption on in all three: nginx `ssl_session_cache shared:SSL:10m;
  ssl_session_tickets on`, HAProxy's defaults (a 20 000-entry cache and tickets), Switchyard
  `session_tickets: true`. ALPN `h2,http/1.1` only in `h2-streams` (nginx `listen ... ssl
  http2`, HAProxy `alpn h2,http/1.1`, Switchyard `http2: true`), `http/1.1` elsewhere. The
  client's preference picks the TLS 1.3 cipher in all three (nginx's and rustls's default;
  HAProxy `prefer-client-ciphers`, its default being its own order, which gave
  TLS_AES_256_GCM_SHA384 where the others gave h2load's TLS_AES_128_GCM_SHA256), so one
  client gets the same cipher and group from all three: the *negotiated* column shows it.
  Backends stay plain HTTP/1.1 with keep-alive as in the other scenarios; one worker, pinned
  as in the other 1-thread scenarios; `X-Forwarded-Proto: https`.
- **Full handshakes** (`tls-handshake-ecdsa`, `tls-handshake-rsa`): `wrk -c50 -H "Connection:
  close"` over https, a new TCP and TLS connection per request. wrk reconnects with
  `SSL_shutdown` + `SSL_clear` on the same `SSL` object, which keeps the session, so plain
  wrk offers the previous connection's ticket on every reconnect and all three servers resume
  it (that is `tls-resume`). wrk runs with a 30-line `LD_PRELOAD` shim (`WRK_SHIM_C` in the
  script, built with `cc` in the temp dir): with `WRK_NO_RESUME=1` it calls
  `SSL_set_session(ssl, NULL)` after `SSL_clear`, so every connection is a full handshake;
  in every https run it sends the SNI `bench.local` where wrk would send the URL's IP
  address (not a valid SNI: rustls ignores it with a warning logged per handshake, which
  Switchyard printed at `RUST_LOG=warn`; browsers send no SNI for an IP). The handshakes of
  a measured run are the ServerHellos the balancer sent in it (captured as below); CPU per
  handshake = the balancer's CPU over the run (`/proc`, as above) / those handshakes, which
  includes the connections wrk leaves in flight at its end (per completed request: the
  per-round table). The client pays more per full handshake than a server (it verifies the
  signature, and runs OpenSSL 3.0), so with ECDSA its one CPU is often the bottleneck:
  handshakes/s then say how fast one wrk core connects, CPU per handshake is the comparison
  (*CPUs busy* under 1).
- **Resumed handshakes** (`tls-resume`): plain wrk as above; every reconnect offers the TLS
  1.3 ticket of the connection before and is resumed (PSK with an X25519 key exchange); the
  first handshake of each of the 50 connections is full.
- **How the handshakes are checked**: during each balancer's warm-up run (same client and
  flags as the measured runs) an `AF_PACKET` socket on `lo` with a classic BPF filter takes
  every TCP segment to or from the balancer's port that starts with a TLS ClientHello or
  ServerHello; the script parses them: ClientHellos = new TLS connections (compared with the
  requests completed: at most the connections in flight more), ClientHellos offering a
  session (`pre_shared_key`), ServerHellos accepting one (`pre_shared_key`: resumed), and the
  version, cipher suite and key-share group from the ServerHello (cleartext in TLS 1.3). A
  scenario whose premise fails (a resumed or offered session in `tls-handshake-*`, a
  reconnect not resumed in `tls-resume`, reconnects in `tls-keepalive`/`h2-streams`, packets
  dropped by the capture) is an error of the run. Not captured during the measured runs:
  the capture costs CPU.
- **HTTP/2** (`h2-streams`): `h2load -t1 -c10 -m32 -D <duration>` over TLS (ALPN h2, checked
  in h2load's output), pinned like wrk; req/s = 2xx answers / duration; errors = h2load's
  failed requests + non-2xx; latency percentiles from `--log-file`. The balancers speak
  HTTP/1.1 with keep-alive to the backend.
"""


def write_docs(doc_path, section):
    block = f"{MARK_START}\n{section}\n{MARK_END}"
    if os.path.exists(doc_path):
        with open(doc_path) as f:
            text = f.read()
        if MARK_START in text and MARK_END in text and \
                text.index(MARK_START) < text.index(MARK_END):
            pre = text[:text.index(MARK_START)]
            post = text[text.index(MARK_END) + len(MARK_END):]
            text = pre + block + post
        else:
            text = text.rstrip("\n") + "\n\n## Results\n\n" + block + "\n"
    else:
        text = ("# Benchmarks\n\nSwitchyard against nginx and HAProxy as load balancers in "
                "front of the same nginx backend, on one machine, all traffic on 127.0.0.1.\n\n"
                "## How to run\n\n`make bench` (Debian, as root) installs nginx, HAProxy, wrk "
                "and matplotlib when missing, builds the release binary and an allocation-"
                "counting variant, runs `tests/bench/bench.py` (about 8 minutes by default; "
                "`BENCH_DURATION` and `BENCH_ROUNDS` change the seconds per run and the rounds) "
                "and rewrites the section between the markers below and "
                "`docs/benchmarks.png`. For a subset: `python3 tests/bench/bench.py --binary "
                "target/release/switchyard --scenarios keepalive-1t,idle-1000 --no-docs`.\n\n"
                "## Results\n\n" + block + "\n")
    with open(doc_path, "w") as f:
        f.write(text)


def write_chart(results, systems, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wrk_results = [r for r in results if r["kind"] == "wrk" and "median" in r]
    if not wrk_results:
        return False
    colors = {"switchyard": "#2b7bba", "nginx": "#3a9e4f", "haproxy": "#d9822b",
              "pingora-proxy": "#7f63b8", "pingora-core": "#9a9a9a"}

    def label(r):
        return r["scenario"] + (" (!)" if sum(r["median"][s]["error_total"] for s in systems
                                              if s in r["median"]) else "")

    def cpu_bars(ax, rs, ylabel, title):
        n = len(systems)
        width = 0.8 / n
        xs = range(len(rs))
        for i, s in enumerate(systems):
            pos = [x - 0.4 + width * (i + 0.5) for x in xs]
            user = [r["median"].get(s, {}).get("user_us", 0.0) for r in rs]
            kern = [r["median"].get(s, {}).get("sys_us", 0.0) for r in rs]
            ax.bar(pos, user, width, color=colors[s], label=f"{LABEL[s]} (user)")
            ax.bar(pos, kern, width, bottom=user, color=colors[s], alpha=0.45, hatch="//",
                   edgecolor="white", label=f"{LABEL[s]} (kernel)")
            for p, u, k in zip(pos, user, kern):
                ax.text(p, u + k, f"{u + k:.0f}" if u + k else "n/a", ha="center",
                        va="bottom", fontsize=7)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([label(r) for r in rs], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(ncol=3, fontsize=8)
        ax.grid(axis="y", alpha=0.3)

    plain = [r for r in wrk_results if not r.get("cert")]
    tls = [r for r in wrk_results if r.get("cert")]
    groups = [g for g in (plain, tls) if g]
    heights = [3] * len(groups) + [2]
    fig, axes = plt.subplots(len(heights), 1, figsize=(13, 4.5 * len(heights)),
                             gridspec_kw={"height_ratios": heights})
    if plain:
        cpu_bars(axes[0], plain, "CPU µs per request (lower is better)",
                 "Balancer CPU per request, plain HTTP: solid = user, hatched = kernel")
    if tls:
        cpu_bars(axes[len(groups) - 1], tls,
                 "CPU µs per handshake / request (lower is better)",
                 "TLS and HTTP/2: CPU per full handshake (tls-handshake-*), per resumed "
                 "handshake (tls-resume), per request (tls-keepalive, h2-streams)")
    ax2 = axes[-1]
    others = [o for o in ("nginx", "haproxy") if o in systems and "switchyard" in systems]
    # a fixed-rate scenario's req/s is the rate it was sent, not a throughput
    peak = [r for r in wrk_results if not r.get("rate")]
    if others and peak:
        xs = range(len(peak))
        width2 = 0.8 / len(others)
        for i, o in enumerate(others):
            pos = [x - 0.4 + width2 * (i + 0.5) for x in xs]
            vals = [wrk_ratios(r).get(o, {}).get("rps", 0.0) for r in peak]
            ax2.bar(pos, vals, width2, color=colors[o], label=f"Switchyard / {LABEL[o]}")
            for p, v in zip(pos, vals):
                ax2.text(p, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        ax2.axhline(1.0, color="black", linewidth=1)
        ax2.set_xticks(list(xs))
        ax2.set_xticklabels([label(r) for r in peak], rotation=20, ha="right",
                            fontsize=8)
        ax2.set_ylabel("requests/s ratio (>1: Switchyard faster)")
        ax2.set_title("Throughput: Switchyard relative to nginx and HAProxy")
        ax2.legend(fontsize=8)
        ax2.grid(axis="y", alpha=0.3)
    else:
        ax2.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# main


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=os.path.join(REPO, "target/release/switchyard"))
    p.add_argument("--alloc-binary", default=None,
                   help="default: switchyard-alloc-count next to --binary")
    p.add_argument("--scenarios", default="all",
                   help="comma-separated letters or names: " + ", ".join(
                       f"{s.letter}={s.name}" for s in SCENARIOS))
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help="comma-separated subset of " + ",".join(SYSTEMS))
    p.add_argument("--pingora-proxy", default=None, metavar="PATH",
                   help="the bare pingora-proxy LB (target/release/bare-pingora-proxy); "
                        "without it that system is skipped")
    p.add_argument("--pingora-core", default=None, metavar="PATH",
                   help="the bare pingora-core proxy (target/release/bare-pingora-core); "
                        "without it that system is skipped")
    p.add_argument("--duration", type=int, default=int(os.environ.get("BENCH_DURATION", 5)),
                   help="seconds per wrk run (env BENCH_DURATION, default 5)")
    p.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", 3)),
                   help="rounds per scenario (env BENCH_ROUNDS, default 3)")
    p.add_argument("--base-port", type=int, default=20000,
                   help="first of 115 consecutive 127.0.0.1 ports used (default 20000)")
    p.add_argument("--no-docs", action="store_true",
                   help="do not write docs/benchmarks.md and docs/benchmarks.png")
    p.add_argument("--no-perf", action="store_true", help="skip the syscall count")
    p.add_argument("--docs", default=os.path.join(REPO, "docs/benchmarks.md"))
    p.add_argument("--chart", default=os.path.join(REPO, "docs/benchmarks.png"))
    args = p.parse_args()
    wanted = [w.strip() for w in args.scenarios.split(",") if w.strip()]
    if wanted == ["all"]:
        # idle-10000 takes 10 000 descriptors in every process and adds little to idle-1000
        # between builds; asked for by name.
        args.selected = [s for s in SCENARIOS if s.idle <= IDLE_CONNECTIONS]
    else:
        by = {s.letter: s for s in SCENARIOS}
        by.update({s.name: s for s in SCENARIOS})
        unknown = [w for w in wanted if w not in by]
        if unknown:
            p.error(f"unknown scenario(s) {unknown}; known: " +
                    ", ".join(f"{s.letter}={s.name}" for s in SCENARIOS))
        args.selected = [s for s in SCENARIOS if s in {by[w] for w in wanted}]
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not args.systems or any(s not in SYSTEMS for s in args.systems):
        p.error(f"--systems: choose from {SYSTEMS}")
    args.systems = [s for s in SYSTEMS if s in args.systems]
    args.refs = {"pingora-proxy": args.pingora_proxy, "pingora-core": args.pingora_core}
    for system in REFS:
        if system in args.systems and not args.refs[system]:
            print(f"{LABEL[system]}: skipped (no --{system} PATH; make bench builds it)")
            args.systems.remove(system)
    if args.duration < 1 or args.rounds < 1:
        p.error("--duration and --rounds must be at least 1")
    if args.alloc_binary is None:
        args.alloc_binary = os.path.join(os.path.dirname(os.path.abspath(args.binary)),
                                         "switchyard-alloc-count")
    return args


def raise_nofile(selected):
    idle = max(s.idle for s in selected) if selected else IDLE_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < idle * 3:
        try:  # root may raise the hard limit too; the balancers inherit it
            resource.setrlimit(resource.RLIMIT_NOFILE, (idle * 3, idle * 3))
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        except (ValueError, OSError):
            pass
    target = hard if hard != resource.RLIM_INFINITY else 65536
    target = min(target, 65536) if hard == resource.RLIM_INFINITY else target
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < idle * 3:
        print(f"warning: RLIMIT_NOFILE is {soft}; {idle} idle connections need about "
              f"{idle * 3}", file=sys.stderr)


def main():
    args = parse_args()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    atexit.register(stop_all)
    raise_nofile(args.selected)
    started = time.monotonic()
    try:
        tools = Tools(os.path.abspath(args.binary), os.path.abspath(args.alloc_binary))
        check_refs(tools, args)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="switchyard-bench-")
    os.chmod(work, 0o755)  # nginx workers may run as another user
    os.makedirs(os.path.join(work, "static"))
    with open(os.path.join(work, "static", "16k.bin"), "wb") as f:
        f.write(b"x" * (BODY_16K - 1) + b"\n")
    layout = Layout(args.base_port)
    meta = {"machine": machine_info(tools),
            "invocation": "python3 " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:]),
            "duration": args.duration, "rounds": args.rounds, "systems": args.systems,
            "workdir": work}
    print(f"switchyard bench: work dir {work}")
    print(f"  {meta['machine']['cpu']}, {meta['machine']['cpus']} CPUs, kernel "
          f"{meta['machine']['kernel']}; " + "; ".join(f"{k} {v}" for k, v in
                                                         tools.versions.items()))
    print(f"  scenarios: {', '.join(s.name for s in args.selected)}; {args.rounds} round(s) x "
          f"{args.duration} s", flush=True)
    results = []
    json_path = os.path.join(work, "results.json")

    def record(res):
        results.append(res)
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1, default=str)

    try:
        ports_free(layout.all_ports())
        tools.require(args.selected)
        if any(sc.tls for sc in args.selected):
            tools.certs = make_certs(tools, work)
            meta["certificates"] = {k: v["describe"] for k, v in tools.certs.items()}
            meta["tls_libraries"] = tls_libraries(tools)
        if any(sc.tls and sc.client == "wrk" for sc in args.selected):
            tools.wrk_shim = build_wrk_shim(tools, work)
        for sc in args.selected:
            print(f"[{sc.letter}] {sc.name}: {sc.title}", flush=True)
            if sc.client == "oha":
                run_rate_scenario(tools, work, sc, layout, args, record, results)
            elif sc.kind == "wrk":
                run_wrk_scenario(tools, work, sc, layout, args, record)
            elif sc.kind == "idle":
                run_memory_scenario(tools, work, sc, layout, args, record, idle_connections,
                                    describe_idle)
            elif sc.kind == "pending":
                run_memory_scenario(tools, work, sc, layout, args, record, pending_heads,
                                    describe_pending)
            elif "switchyard" in args.systems:
                run_alloc_scenario(tools, work, sc, layout, args, record)
    except BenchError as e:
        print(f"\nbench: STOPPED: {e}", file=sys.stderr)
        print(f"bench: work dir with configs and logs: {work}", file=sys.stderr)
        return 2
    finally:
        stop_all()
    for r in results:
        for run in r.get("rounds", {}).values():
            for x in run:
                x.pop("wrk_output", None)
    keeps = [next((s for s in args.selected if s.kind == "wrk" and not s.tls), None),
             next((s for s in args.selected if s.h2), None) or
             next((s for s in args.selected if s.tls), None)]
    for keep in filter(None, keeps):
        for system, ext in (("switchyard", "yaml"), ("nginx", "conf"), ("haproxy", "cfg")):
            path = os.path.join(work, f"{system}-{keep.name}.{ext}")
            if os.path.exists(path):
                with open(path) as f:
                    meta.setdefault("example_configs", {})[f"{system}-{keep.name}.{ext}"] = \
                        f.read().replace(work, "$TMP")
    meta["wall_seconds"] = time.monotonic() - started
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
    errors = any_errors(results)
    print_summary(results, args.systems)
    if errors:
        print("\n!!! ERRORS: some requests failed; the numbers are not trustworthy:")
        for e in errors:
            print(f"!!!   {e}")
    print(f"raw results: {json_path}")
    print(f"wall time: {meta['wall_seconds']:.0f} s")
    if not args.no_docs:
        write_docs(args.docs, markdown(results, meta, args, errors))
        print(f"wrote {os.path.relpath(args.docs)}")
        try:
            if write_chart(results, args.systems, args.chart):
                print(f"wrote {os.path.relpath(args.chart)}")
        except ImportError:
            print("matplotlib missing: no chart (python3 -m pip install matplotlib)",
                  file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Switchyard against nginx and HAProxy: throughput, latency, CPU per request, memory per
idle connection, syscalls and allocations per request. `make bench` builds the binaries and
runs this; by hand:

    python3 tests/bench/bench.py --binary target/release/switchyard [--scenarios a,c,idle-1000]
        [--duration 5] [--rounds 3] [--no-docs]

Needs nginx, haproxy, wrk and taskset on PATH (perf optional: syscall counts), matplotlib for
the chart. All traffic stays on 127.0.0.1; every process it starts runs from a fresh temp
directory and is stopped by its own PID. Results go to stdout, to <tmp>/results.json and,
unless --no-docs, between the markers of docs/benchmarks.md and to docs/benchmarks.png.
Exits 1 when a run saw any error (a failed request), 2 when it could not run.
"""
import argparse
import atexit
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
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYSTEMS = ["switchyard", "nginx", "haproxy"]
LABEL = {"switchyard": "Switchyard", "nginx": "nginx", "haproxy": "HAProxy"}
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


class Scenario:
    def __init__(self, letter, name, title, kind="wrk", threads=1, backends=1, algorithm="rr",
                 routes=0, path="/", big=False, close=False):
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


SCENARIOS = [
    Scenario("a", "keepalive-1t", "keep-alive, tiny responses, 1 worker thread"),
    Scenario("b", "keepalive-2t", "keep-alive, tiny responses, 2 worker threads (nothing pinned)",
             threads=2),
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
    Scenario("i", "idle-1000", "resident memory per idle client connection (1 000 connections)",
             kind="idle"),
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
    def __init__(self, port, timeout=5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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


def http_get_once(port, path, timeout=2.0):
    conn = HttpConn(port, timeout)
    try:
        return conn.get(path, close=True)
    finally:
        conn.close()


def wait_ready(proc, port, path, limit=30.0):
    deadline = time.monotonic() + limit
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited with code {proc.popen.returncode} before it "
                             f"answered.\ncommand: {' '.join(proc.cmd)}\n--- its output ---\n"
                             f"{proc.stderr_tail()}")
        try:
            status, _, body = http_get_once(port, path)
            if status == 200:
                return
            last = f"status {status}: {body[:200]!r}"
        except (OSError, ValueError, IndexError) as e:
            last = str(e)
        time.sleep(0.05)
    raise BenchError(f"{proc.name} did not answer 200 on 127.0.0.1:{port}{path} within "
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
        self.lb_port = {"switchyard": base + 110, "nginx": base + 111, "haproxy": base + 112}

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


def switchyard_conf(work, sc, layout):
    algorithm = {"rr": "round_robin", "least_conn": "least_connections",
                 "ip_hash": "ip_hash"}[sc.algorithm]
    out = [
        "server:",
        f"  threads: {sc.threads}",
        "  grace_period: 5s",
        # Fits a hard open-file limit of 20 000 (this kind of machine); the default 10 000
        # connections would need 20 256 descriptors.
        "  max_connections: 4096",
        f"  upgrade_socket: {work}/sy.sock",
        "listeners:",
        f"  - address: 127.0.0.1:{layout.lb_port['switchyard']}",
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


def nginx_lb_conf(work, sc, layout, name):
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
    return f"""# nginx as the load balancer: {sc.name}
{user_line()}daemon off;
master_process on;
worker_processes {sc.threads};
worker_rlimit_nofile 20000;
pid {work}/{name}.pid;
error_log {work}/{name}-error.log warn;
events {{ worker_connections 10000; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
{upstreams}  server {{
    listen 127.0.0.1:{layout.lb_port['nginx']} backlog=4096;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $http_host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header X-Forwarded-Host $host;
{locations}  }}
}}
"""


def haproxy_conf(work, sc, layout):
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
    return f"""# HAProxy as the load balancer: {sc.name}
global
  nbthread {sc.threads}
  maxconn 4000

defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
  http-reuse always
  option forwardfor

frontend fe
  bind 127.0.0.1:{layout.lb_port['haproxy']} backlog 4096
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
{rules}
{backends}"""


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
        m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", self.versions["nginx"])
        self.nginx_has_e = bool(m) and tuple(map(int, m.groups())) >= (1, 19, 5)

    def pin(self, pinned, cpu):
        return [self.taskset, "-c", str(cpu)] if pinned else []

    def nginx_cmd(self, prefix, conf, errlog):
        cmd = [self.nginx, "-p", prefix, "-c", conf]
        return cmd + (["-e", errlog] if self.nginx_has_e else [])


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


class Balancer:
    """A running balancer: the process and the PIDs to measure."""

    def __init__(self, system, proc, port):
        self.system = system
        self.proc = proc
        self.port = port

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
    if system == "switchyard":
        conf = write(os.path.join(work, f"{name}.yaml"), switchyard_conf(work, sc, layout))
        env["RUST_LOG"] = "warn"
        cmd = pin + [binary or tools.binary, "run", "--config", conf]
    elif system == "nginx":
        d = os.path.join(work, name)
        os.makedirs(d, exist_ok=True)
        conf = write(os.path.join(work, f"{name}.conf"), nginx_lb_conf(work, sc, layout, name))
        cmd = pin + tools.nginx_cmd(d + "/", conf, f"{work}/{name}-error.log")
    else:
        conf = write(os.path.join(work, f"{name}.cfg"), haproxy_conf(work, sc, layout))
        cmd = pin + [tools.haproxy, "-db", "-f", conf]
    proc = Proc(name, cmd, work, env=env)
    wait_ready(proc, port, sc.path)
    if system == "nginx":
        deadline = time.monotonic() + 10
        while len(proc.children()) < sc.threads and time.monotonic() < deadline:
            time.sleep(0.05)
        if len(proc.children()) != sc.threads:
            raise BenchError(f"nginx should have {sc.threads} worker(s), has "
                             f"{proc.children()}")
    return Balancer(system, proc, port), cmd


def sanity_check(bal, sc):
    """Right body through one keep-alive connection; how many backends answer 200 requests."""
    conn = HttpConn(bal.port)
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
    cmd.append(f"http://127.0.0.1:{port}{sc.path}")
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


def measure(tools, work, sc, bal, layout, duration):
    clk = os.sysconf("SC_CLK_TCK")
    pids = bal.cpu_pids()
    acc0 = stub_accepts(layout.stub_port)
    u0, s0 = cpu_ticks(pids)
    res, cmd = run_wrk(tools, work, sc, bal.port, duration)
    u1, s1 = cpu_ticks(pids)
    acc1 = stub_accepts(layout.stub_port)
    n = max(res["requests"], 1)
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


def idle_connections(bal, sc, count=IDLE_CONNECTIONS):
    conn = HttpConn(bal.port)
    for _ in range(200):  # warm: the backend connection, buffers, code paths
        conn.get(sc.path)
    conn.close()
    time.sleep(0.5)
    before = rss_kib(bal.rss_pids())
    socks = []
    bad = 0
    try:
        for _ in range(count):
            socks.append(HttpConn(bal.port, timeout=10))
        for c in socks:  # one after the other: a single backend connection suffices
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
            socks.append(HttpConn(bal.port, timeout=10))
        for c in socks:
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
            "cpu_us", "cpu_load", "backend_conns_per_1k"]
    out = {k: median([r[k] for r in rounds]) for k in keys}
    out["error_total"] = sum(r["error_total"] for r in rounds)
    out["errors"] = {k: sum(r["errors"][k] for r in rounds) for k in rounds[0]["errors"]}
    return out


def run_wrk_scenario(tools, work, sc, layout, args, record):
    backend = start_backend(tools, work, sc, layout)
    balancers = {}
    result = {"scenario": sc.name, "title": sc.title, "kind": "wrk", "threads": sc.threads,
              "pinned": sc.pinned, "rounds": {s: [] for s in args.systems}, "commands": {},
              "backends_seen": {}}
    try:
        for system in args.systems:
            bal, cmd = start_balancer(tools, work, sc, layout, system)
            balancers[system] = bal
            result["commands"][system] = show_cmd(cmd, work)
            result["backends_seen"][system] = sanity_check(bal, sc)
            run_wrk(tools, work, sc, bal.port, WARMUP_SECONDS)
        for rnd in range(args.rounds):
            for system in args.systems:
                res, cmd = measure(tools, work, sc, balancers[system], layout, args.duration)
                result["commands"]["wrk"] = show_cmd(cmd, work).replace(
                    f":{balancers[system].port}/", ":$PORT/")
                res["round"] = rnd + 1
                result["rounds"][system].append(res)
                flag = f"  !!! {res['error_total']} ERRORS {res['errors']}" \
                    if res["error_total"] else ""
                print(f"  {sc.name:<13} round {rnd + 1} {LABEL[system]:<10} "
                      f"{res['rps']:>9.0f} req/s  p99 {fmt_ms(res['p99_us'])} ms  "
                      f"cpu {res['cpu_us']:6.1f} us/req (user {res['user_us']:.1f}, "
                      f"kernel {res['sys_us']:.1f}){flag}", flush=True)
        result["median"] = {s: summarize(result["rounds"][s]) for s in args.systems}
        if sc.name == "keepalive-1t" and not args.no_perf:
            result["syscalls"] = {}
            for system in args.systems:
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


def run_memory_scenario(tools, work, sc, layout, args, record, measure, describe):
    """One balancer at a time: `measure(bal, sc)` its memory, `describe(res)` it in a line."""
    backend = start_backend(tools, work, sc, layout)
    result = {"scenario": sc.name, "title": sc.title, "kind": sc.kind, "systems": {},
              "commands": {}}
    try:
        for system in args.systems:
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
            f"{res['rss_after_kib']} KiB; closed {res['rss_closed_kib']}, second 1000 "
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
            for system, v in res.get("syscalls", {}).items():
                if v.get("error_total"):
                    bad.append(f"{res['scenario']} perf run {LABEL[system]}: "
                               f"{v['error_total']} errors")
        elif res["kind"] == "idle":
            for system, v in res["systems"].items():
                if v["non_200"] or v["still_answering"] != v["connections"]:
                    bad.append(f"idle-1000 {LABEL[system]}: {v['non_200']} non-200 answers, "
                               f"{v['still_answering']}/{v['connections']} still answering")
    return bad


def print_summary(results, systems):
    print("\n" + "=" * 100)
    head = f"{'scenario':<14}" + "".join(f"{LABEL[s] + ' req/s':>18}" for s in systems) + \
        "".join(f"{LABEL[s] + ' cpu us/req':>22}" for s in systems) + "  errors"
    print(head)
    for res in results:
        if res["kind"] != "wrk" or "median" not in res:
            continue
        med = res["median"]
        line = f"{res['scenario']:<14}"
        line += "".join(f"{med[s]['rps']:>18.0f}" for s in systems)
        line += "".join(f"{med[s]['cpu_us']:>22.1f}" for s in systems)
        errs = sum(med[s]["error_total"] for s in systems)
        line += f"  {'!!! ' + str(errs) if errs else 0}"
        print(line)
        for other, r in wrk_ratios(res).items():
            print(f"{'':<14}Switchyard/{LABEL[other]}: req/s x{r['rps']:.2f}, "
                  f"CPU per request x{r['cpu']:.2f} (>1: Switchyard better)")
    for res in results:
        if res["kind"] == "idle":
            for s, v in res["systems"].items():
                print(f"idle-1000     {LABEL[s]:<10} {v['per_conn_kib']:.2f} KiB per idle "
                      f"connection, RSS {v['rss_after_kib']} KiB with 1000 open")
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
    for k in ("switchyard", "nginx", "haproxy", "wrk"):
        L.append(f"| {k} | {m['versions'].get(k, '?')} |")
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
            row = f"| {res['scenario']} | " + " | ".join(f"{med[s]['rps']:,.0f}" for s in systems)
            row += " | " + " | ".join(f"{med[s]['cpu_us']:.1f}" for s in systems)
            rat = wrk_ratios(res)
            for o in ratios_cols:
                row += f" | {rat[o]['rps']:.2f} | {rat[o]['cpu']:.2f}"
            errs = sum(med[s]["error_total"] for s in systems)
            row += f" | {'**' + str(errs) + '**' if errs else 0} |"
            L.append(row)
        L.append("")

    for res in results:
        L.append(f"### `{res['scenario']}`: {res['title']}")
        L.append("")
        if res["kind"] == "wrk" and "median" in res:
            med = res["median"]
            pin = ("balancer pinned to CPU 0 (`taskset -c 0`), wrk and the backend to CPU 1"
                   if res["pinned"] else "nothing pinned: balancer, wrk and backend share "
                   "both CPUs")
            L.append(f"{res['threads']} worker thread(s)/process(es) per balancer; {pin}.")
            L.append("")
            L.append("| system | req/s | p50 ms | p99 ms | p99.9 ms | CPU µs/req user | "
                     "kernel | total | CPUs busy | backend conns /1k req | errors |")
            L.append("|---|---|---|---|---|---|---|---|---|---|---|")
            for s in systems:
                v = med[s]
                err = v["error_total"]
                err_s = f"**{err}** {v['errors']}" if err else "0"
                L.append(f"| {LABEL[s]} | {v['rps']:,.0f} | {fmt_ms(v['p50_us'])} | "
                         f"{fmt_ms(v['p99_us'])} | {fmt_ms(v['p999_us'])} | "
                         f"{v['user_us']:.1f} | {v['sys_us']:.1f} | {v['cpu_us']:.1f} | "
                         f"{fmt(v['cpu_load'], '.2f')} | "
                         f"{fmt(v['backend_conns_per_1k'], '.2f')} | {err_s} |")
            L.append("")
            rat = wrk_ratios(res)
            if rat:
                L.append("Switchyard relative (>1: Switchyard better): " + "; ".join(
                    f"vs {LABEL[o]} req/s ×{r['rps']:.2f}, CPU/req ×{r['cpu']:.2f}"
                    for o, r in rat.items()) + ".")
                L.append("")
            seen = res.get("backends_seen", {})
            if seen:
                L.append("Distinct backends answering 200 sequential requests (sanity check): " +
                         ", ".join(f"{LABEL[s]} {n}" for s, n in seen.items()) + ".")
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
            L.append("| round | system | req/s | p50 ms | p75 ms | p90 ms | p99 ms | p99.9 ms | "
                     "user µs/req | kernel µs/req | total µs/req | errors |")
            L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
            for rnd in range(args.rounds):
                for s in systems:
                    if rnd >= len(res["rounds"][s]):
                        continue
                    r = res["rounds"][s][rnd]
                    L.append(f"| {r['round']} | {LABEL[s]} | {r['rps']:,.0f} | "
                             f"{fmt_ms(r['p50_us'])} | {fmt_ms(r['p75_us'])} | "
                             f"{fmt_ms(r['p90_us'])} | {fmt_ms(r['p99_us'])} | "
                             f"{fmt_ms(r['p999_us'])} | {r['user_us']:.1f} | "
                             f"{r['sys_us']:.1f} | {r['cpu_us']:.1f} | {r['error_total']} |")
            L.append("")
            L.append("</details>")
        elif res["kind"] == "idle":
            L.append(f"One worker thread, same config as `keepalive-1t`, balancer pinned to "
                     f"CPU 0. After 200 warm-up requests, RSS (`VmRSS`; nginx: its worker) is "
                     f"read, {IDLE_CONNECTIONS} client connections are opened, each sends one "
                     f"keep-alive GET and reads the answer (one after the other, so one "
                     f"backend connection suffices), and RSS is read again after 1 s. Then "
                     f"they are closed (RSS read after 1 s) and a second batch of "
                     f"{IDLE_CONNECTIONS} is opened the same way: its per-connection figure "
                     f"is against the first baseline, so it shows whether the memory of "
                     f"closed connections is reused.")
            L.append("")
            L.append("| system | KiB per idle connection | RSS before KiB | RSS with 1 000 "
                     "open KiB | RSS after closing KiB | second 1 000: RSS KiB | "
                     "second 1 000: KiB/conn | non-200 answers | still answering after 1 s |")
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
- **CPU per request**: utime and stime from `/proc/PID/stat` (fields 14 and 15) of the
  balancer before and after the wrk run (nginx: master + workers, the master is idle),
  divided by the requests wrk completed. Resolution is one clock tick (10 ms) per run.
- **Pinning**: 1-thread scenarios run the balancer under `taskset -c 0` and wrk plus the
  backend under `taskset -c 1`; `keepalive-2t` pins nothing (on a 2-CPU machine the balancer
  then competes with wrk and the backend).
- **Equivalent settings**: the same number of worker threads (Switchyard `server.threads`,
  nginx `worker_processes`, HAProxy `nbthread`); backend keep-alive everywhere (nginx
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
    names = [r["scenario"] + (" (!)" if sum(r["median"][s]["error_total"] for s in systems)
                              else "") for r in wrk_results]
    colors = {"switchyard": "#2b7bba", "nginx": "#3a9e4f", "haproxy": "#d9822b"}
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 9), gridspec_kw={"height_ratios": [3, 2]})
    n = len(systems)
    width = 0.8 / n
    xs = range(len(wrk_results))
    for i, s in enumerate(systems):
        pos = [x - 0.4 + width * (i + 0.5) for x in xs]
        user = [r["median"][s]["user_us"] for r in wrk_results]
        kern = [r["median"][s]["sys_us"] for r in wrk_results]
        ax1.bar(pos, user, width, color=colors[s], label=f"{LABEL[s]} (user)")
        ax1.bar(pos, kern, width, bottom=user, color=colors[s], alpha=0.45, hatch="//",
                edgecolor="white", label=f"{LABEL[s]} (kernel)")
        for p, u, k in zip(pos, user, kern):
            ax1.text(p, u + k, f"{u + k:.0f}", ha="center", va="bottom", fontsize=7)
    ax1.set_xticks(list(xs))
    ax1.set_xticklabels(names)
    ax1.set_ylabel("CPU µs per request (lower is better)")
    ax1.set_title("Balancer CPU per request: solid = user, hatched = kernel")
    ax1.legend(ncol=3, fontsize=8)
    ax1.grid(axis="y", alpha=0.3)

    others = [o for o in ("nginx", "haproxy") if o in systems and "switchyard" in systems]
    if others:
        width2 = 0.8 / len(others)
        for i, o in enumerate(others):
            pos = [x - 0.4 + width2 * (i + 0.5) for x in xs]
            vals = [wrk_ratios(r)[o]["rps"] for r in wrk_results]
            ax2.bar(pos, vals, width2, color=colors[o], label=f"Switchyard / {LABEL[o]}")
            for p, v in zip(pos, vals):
                ax2.text(p, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        ax2.axhline(1.0, color="black", linewidth=1)
        ax2.set_xticks(list(xs))
        ax2.set_xticklabels(names)
        ax2.set_ylabel("requests/s ratio (>1: Switchyard faster)")
        ax2.set_title("Throughput: Switchyard relative to nginx and HAProxy")
        ax2.legend(fontsize=8)
        ax2.grid(axis="y", alpha=0.3)
    else:
        ax2.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
                   help="comma-separated subset of switchyard,nginx,haproxy")
    p.add_argument("--duration", type=int, default=int(os.environ.get("BENCH_DURATION", 5)),
                   help="seconds per wrk run (env BENCH_DURATION, default 5)")
    p.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", 3)),
                   help="rounds per scenario (env BENCH_ROUNDS, default 3)")
    p.add_argument("--base-port", type=int, default=20000,
                   help="first of 113 consecutive 127.0.0.1 ports used (default 20000)")
    p.add_argument("--no-docs", action="store_true",
                   help="do not write docs/benchmarks.md and docs/benchmarks.png")
    p.add_argument("--no-perf", action="store_true", help="skip the syscall count")
    p.add_argument("--docs", default=os.path.join(REPO, "docs/benchmarks.md"))
    p.add_argument("--chart", default=os.path.join(REPO, "docs/benchmarks.png"))
    args = p.parse_args()
    wanted = [w.strip() for w in args.scenarios.split(",") if w.strip()]
    if wanted == ["all"]:
        args.selected = list(SCENARIOS)
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
    if args.duration < 1 or args.rounds < 1:
        p.error("--duration and --rounds must be at least 1")
    if args.alloc_binary is None:
        args.alloc_binary = os.path.join(os.path.dirname(os.path.abspath(args.binary)),
                                         "switchyard-alloc-count")
    return args


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    target = min(target, 65536) if hard == resource.RLIM_INFINITY else target
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE_CONNECTIONS * 3:
        print(f"warning: RLIMIT_NOFILE is {soft}; idle-1000 needs about "
              f"{IDLE_CONNECTIONS * 3}", file=sys.stderr)


def main():
    args = parse_args()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    atexit.register(stop_all)
    raise_nofile()
    started = time.monotonic()
    try:
        tools = Tools(os.path.abspath(args.binary), os.path.abspath(args.alloc_binary))
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
        for sc in args.selected:
            print(f"[{sc.letter}] {sc.name}: {sc.title}", flush=True)
            if sc.kind == "wrk":
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
    keep = next((s for s in args.selected if s.kind == "wrk"), None)
    if keep:
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

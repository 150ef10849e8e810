"""An HTTPS/1.1 test backend: Python's http.server, each connection wrapped in TLS.

Usage: https_backend.py CERT KEY NAME SICK_FILE

Listens on a free port of 127.0.0.1 and prints the port on its first line once it serves.
`GET /healthz` answers 200, or 503 while SICK_FILE exists; any other GET answers 200 with NAME
as its body. A POST answers 204 and is written to stderr as `POST PATH LENGTH`. Every answer has `X-Backend: NAME` and `X-Tls-Version` (the connection's TLS
version). A connection whose handshake fails is closed; the server goes on.
"""

import http.server
import os
import ssl
import sys

CERT, KEY, NAME, SICK_FILE = sys.argv[1:5]

context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(CERT, KEY)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        # The handshake in the connection's own thread: one that fails or stalls holds up no
        # other connection.
        self.request = context.wrap_socket(self.request, server_side=True)
        super().setup()

    def do_GET(self):
        if self.path == "/healthz":
            status, body = (503 if os.path.exists(SICK_FILE) else 200), b"ok\n"
        else:
            status, body = 200, NAME.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", NAME)
        self.send_header("X-Tls-Version", self.request.version())
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        # A rollout notification: its path goes to the output, which the tests read.
        length = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(length)
        print(f"POST {self.path} {length}", file=sys.stderr, flush=True)
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a failed handshake (a client that does not trust us) is a test's point


server = Server(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()

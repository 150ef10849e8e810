"""A gRPC test backend: a grpcio server with a generic handler, so no generated code.

Usage: grpc_backend.py NAME [CERT KEY]

Listens on a free port of 127.0.0.1: cleartext HTTP/2 (h2c), or HTTP/2 over TLS with CERT
and KEY (PEM files). Prints the port on its first line once it serves. Service `test.Echo`,
requests and answers as raw bytes:

- `Say`: answers "NAME PEER: REQUEST", PEER being the client's address as gRPC names it
  (`ipv4:127.0.0.1:PORT`): one PEER per connection.
- `Fail`: ends with UNAVAILABLE before any message: a trailers-only answer, whose grpc-status
  comes in the response head.
- `SayThenFail` (server streaming): sends "NAME" once, then ends with INTERNAL: grpc-status
  comes in the trailers.
"""

import sys
from concurrent import futures

import grpc


def main():
    name = sys.argv[1]
    tls = sys.argv[2:4]

    def say(request, context):
        return f"{name} {context.peer()}: ".encode() + request

    def fail(request, context):
        context.abort(grpc.StatusCode.UNAVAILABLE, "injected failure")

    def say_then_fail(request, context):
        yield name.encode()
        context.abort(grpc.StatusCode.INTERNAL, "failed after the first message")

    def raw(behaviour, streaming=False):
        handler = grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
        return handler(behaviour, request_deserializer=None, response_serializer=None)

    service = grpc.method_handlers_generic_handler(
        "test.Echo",
        {"Say": raw(say), "Fail": raw(fail), "SayThenFail": raw(say_then_fail, streaming=True)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((service,))
    if tls:
        with open(tls[0], "rb") as cert, open(tls[1], "rb") as key:
            credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
        port = server.add_secure_port("127.0.0.1:0", credentials)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()

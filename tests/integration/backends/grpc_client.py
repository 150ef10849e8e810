"""A gRPC test client (grpcio, no generated code) for grpc_backend.py's service.

Usage: grpc_client.py ADDRESS METHOD [CALLS]

Calls /test.Echo/METHOD on ADDRESS (host:port) in cleartext HTTP/2 (h2c) with the request
"hello", CALLS times (default 1) on one channel, and prints one line of JSON per call:
{"code": "OK" | "UNAVAILABLE" | ..., "details": ..., "messages": [...]}.
A server-streaming method (SayThenFail) is read to its end.
"""

import json
import sys

import grpc


def call(channel, method):
    path = f"/test.Echo/{method}"
    messages = []
    try:
        if method == "SayThenFail":
            for message in channel.unary_stream(path)(b"hello", timeout=10):
                messages.append(message.decode())
        else:
            messages.append(channel.unary_unary(path)(b"hello", timeout=10).decode())
        code, details = "OK", ""
    except grpc.RpcError as e:
        code, details = e.code().name, e.details()
    return {"code": code, "details": details, "messages": messages}


def main():
    address, method = sys.argv[1:3]
    calls = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    with grpc.insecure_channel(address) as channel:
        for _ in range(calls):
            print(json.dumps(call(channel, method)), flush=True)


if __name__ == "__main__":
    main()

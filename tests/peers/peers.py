"""Real protocol peers for the loopback tests, from stacks that are not ours and enforce their
protocols: gRPC's C-core (PyPI's grpcio) and hyper-h2 (PyPI's h2).

  peers.py grpc-server PORT NAME    a C-core gRPC server:
                                    gamma.Echo/{Echo,Slow,Fail,Mirror,Chat,Hold}
  peers.py grpc-call TARGET AUTHORITY METHOD TIMEOUT_S PAYLOAD_BYTES
                                    a C-core gRPC client call; prints one JSON line
  peers.py grpc-streams TARGET AUTHORITY
                                    a C-core client's harder calls on one channel: a bidi stream
                                    answered message by message, 3 MiB both ways, 300 calls at
                                    once, binary trailing metadata; prints one JSON line
  peers.py grpc-uploads TARGET AUTHORITY N
                                    N client-streaming uploads of 256 KiB on one channel to a
                                    server that reads none for 4 s, and a unary call beside them
                                    (2 s deadline); prints one JSON line
  peers.py h2-server PORT           a strict HTTP/2 (prior knowledge) server: a request whose
                                    `host` differs from `:authority` is malformed (RFC 9113
                                    8.3.1) and gets 400; others get 200 and what it saw, as JSON

Servers print `ready` once listening and serve until killed. Run by `tests/tests/real_peers.rs`
with the venv `cargo xtask setup` makes.
"""

import json
import socket
import sys
import threading
import time


def grpc_server(port, name):
    from concurrent import futures

    import grpc

    def echo(request, context):
        metadata = dict(context.invocation_metadata())
        return json.dumps(
            {"pod": name, "bytes": len(request), "te": metadata.get("te"),
             "x-from-route": metadata.get("x-from-route")}
        ).encode()

    def slow(request, context):
        # Server streaming: a message every 200 ms, for a deadline to cut.
        for i in range(50):
            yield json.dumps({"pod": name, "i": i}).encode()
            time.sleep(0.2)

    def fail(request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing (from the backend)")

    def mirror(request, context):
        # The request back, with trailing metadata: one binary (base64 on the wire), one text.
        context.set_trailing_metadata((("x-trail-bin", b"\x00\xff" + request[:4]), ("x-trail", name)))
        return request

    def chat(requests, context):
        # Bidi: each message answered as it arrives (the caller waits for it before the next).
        for request in requests:
            yield name.encode() + b":" + request

    def hold(requests, context):
        # Client streaming, read only after 4 s: its messages wait in flow-control windows, the
        # server's and every hop's before it.
        time.sleep(4)
        return str(sum(len(r) for r in requests)).encode()

    identity = lambda b: b  # noqa: E731 - raw bytes in, raw bytes out
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo, identity, identity),
        "Slow": grpc.unary_stream_rpc_method_handler(slow, identity, identity),
        "Fail": grpc.unary_unary_rpc_method_handler(fail, identity, identity),
        "Mirror": grpc.unary_unary_rpc_method_handler(mirror, identity, identity),
        "Chat": grpc.stream_stream_rpc_method_handler(chat, identity, identity),
        "Hold": grpc.stream_unary_rpc_method_handler(hold, identity, identity),
    }
    # At most 100 streams at once on a connection, as many HTTP/2 servers say (SETTINGS).
    # Windows not grown past what the handlers read (no BDP probing), so that a stream nobody
    # reads holds its data at the hops before the server.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=40),
                         options=[("grpc.max_concurrent_streams", 100),
                                  ("grpc.http2.bdp_probe", 0),
                                  ("grpc.http2.lookahead_bytes", 16384)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("gamma.Echo", handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def grpc_call(target, authority, method, timeout_s, payload_bytes):
    import grpc

    channel = grpc.insecure_channel(target, options=[("grpc.default_authority", authority)])
    path = f"/gamma.Echo/{method}"
    payload = b"x" * int(payload_bytes)
    identity = lambda b: b  # noqa: E731
    messages = []
    try:
        if method == "Slow":
            call = channel.unary_stream(path, identity, identity)
            for message in call(payload, timeout=float(timeout_s)):
                messages.append(json.loads(message))
        else:
            call = channel.unary_unary(path, identity, identity)
            messages.append(json.loads(call(payload, timeout=float(timeout_s))))
        code, details = "OK", ""
    except grpc.RpcError as e:
        code, details = e.code().name, e.details()
    print(json.dumps({"code": code, "details": details, "messages": messages}), flush=True)


def grpc_streams(target, authority):
    import queue

    import grpc

    channel = grpc.insecure_channel(target, options=[("grpc.default_authority", authority)])
    identity = lambda b: b  # noqa: E731
    seen = {}

    # A bidi stream, message by message: nothing is sent before the last answer came back, so a
    # proxy that holds a stream's data until more arrives (or until its end) stalls it.
    outgoing = queue.Queue()
    chat = channel.stream_stream("/gamma.Echo/Chat", identity, identity)(
        iter(outgoing.get, None), timeout=20)
    answers = []
    for i in range(20):
        outgoing.put(f"m{i}".encode())
        answers.append(next(chat).decode())
    outgoing.put(None)
    seen["chat"] = answers
    seen["chat_code"] = chat.code().name

    # 3 MiB each way: many times HTTP/2's initial 64 KiB windows, on the caller's side and on the
    # backend's; the payload comes back byte for byte.
    big = bytes(range(256)) * (3 * 4096)
    mirror = channel.unary_unary("/gamma.Echo/Mirror", identity, identity)
    answer, call = mirror.with_call(big, timeout=20)
    seen["big_equal"] = answer == big
    seen["trailers"] = {k: (v.hex() if isinstance(v, bytes) else v)
                        for k, v in call.trailing_metadata()}

    # More calls at once than an HTTP/2 server's usual 100 concurrent streams.
    futures = [mirror.future(f"c{i}".encode(), timeout=20) for i in range(300)]
    results = []
    for i, f in enumerate(futures):
        try:
            results.append(f.result() == f"c{i}".encode())
        except grpc.RpcError as e:
            results.append(e.code().name)
    seen["concurrent_ok"] = sum(1 for r in results if r is True)
    seen["concurrent_failed"] = sorted({str(r) for r in results if r is not True})
    print(json.dumps(seen), flush=True)


def grpc_uploads(target, authority, uploads):
    import grpc

    channel = grpc.insecure_channel(target, options=[("grpc.default_authority", authority)])
    identity = lambda b: b  # noqa: E731
    upload = channel.stream_unary("/gamma.Echo/Hold", identity, identity)
    chunk = b"u" * 16384
    held = [upload.future(iter([chunk] * 16), timeout=30) for _ in range(int(uploads))]
    # Their first window's worth is on its way: what they send waits for the server.
    time.sleep(1)
    seen = {}
    echo = channel.unary_unary("/gamma.Echo/Echo", identity, identity)
    started = time.monotonic()
    try:
        echo(b"beside", timeout=2)
        seen["unary"] = "OK"
    except grpc.RpcError as e:
        seen["unary"] = e.code().name
    seen["unary_ms"] = round((time.monotonic() - started) * 1000)
    results = []
    for f in held:
        try:
            results.append(f.result().decode())
        except grpc.RpcError as e:
            results.append(e.code().name)
    seen["uploads"] = sorted(set(results))
    print(json.dumps(seen), flush=True)


def h2_server(port):
    import h2.config
    import h2.connection
    import h2.events

    def serve(sock):
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        conn = h2.connection.H2Connection(config=config)
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        requests = {}
        while True:
            data = sock.recv(65535)
            if not data:
                return
            try:
                events = conn.receive_data(data)
            except Exception as e:  # a protocol error: h2 has queued GOAWAY
                sock.sendall(conn.data_to_send())
                print(f"protocol error: {e}", file=sys.stderr, flush=True)
                return
            for event in events:
                if isinstance(event, h2.events.RequestReceived):
                    requests[event.stream_id] = event.headers
                elif isinstance(event, h2.events.StreamEnded):
                    respond(conn, event.stream_id, requests.pop(event.stream_id, []))
            sock.sendall(conn.data_to_send())

    def respond(conn, stream_id, headers):
        authority = [v for k, v in headers if k == ":authority"]
        host = [v for k, v in headers if k == "host"]
        seen = {
            "authority": authority[0] if authority else None,
            "host": host[0] if host else None,
            "path": next((v for k, v in headers if k == ":path"), None),
            "cookie": [v for k, v in headers if k == "cookie"],
        }
        status = "200"
        if not authority or (host and host[0] != authority[0]):
            status = "400"
            seen["error"] = "host differs from :authority (RFC 9113 8.3.1)"
        body = json.dumps(seen).encode()
        conn.send_headers(stream_id, [(":status", status), ("content-type", "application/json"),
                                      ("content-length", str(len(body)))])
        conn.send_data(stream_id, body, end_stream=True)

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", int(port)))
    listener.listen(64)
    print("ready", flush=True)
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=serve, args=(sock,), daemon=True).start()


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    {"grpc-server": grpc_server, "grpc-call": grpc_call, "grpc-streams": grpc_streams,
     "grpc-uploads": grpc_uploads, "h2-server": h2_server}[command](*args)

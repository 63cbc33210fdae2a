"""A real HTTP server speaking the OpenAI chat-completions protocol, with fault injection.

Used by tests/synthesis/test_llm_text.py and tests/synthesis/test_synthesis_cli.py. It binds
127.0.0.1 on a free port, answers POST /v1/chat/completions with a reply derived only from the
prompt (so tests know the expected text) and a usage block, and can be told to misbehave:
`server.faults` is a FIFO consumed one per request in arrival order; `always_fault`, when set, is
the fault of every request the FIFO does not cover (an endpoint that keeps failing); `always_malformed`
holds prompt substrings that always get a reply mentioning "AU12". The faults: "429", "500", "hang"
(answers after `hang_s`), "garbage" (a cut JSON body), "kill" (the connection dies mid-body),
"malformed" (a reply the checks reject), and four bodies that are not a chat completion although
the status is 200: "html" (a proxy's error page), "json_string" (a bare JSON string), "no_choices"
(a completion object without `choices`), "message_null" (a choice whose message is null).
`unused_base_url()` is an endpoint that is down (nothing listens on its port).

    with FakeOpenAIServer() as server:
        server.faults.extend(["429", "500", "hang", "garbage", "kill", "malformed"])
        client = OpenAI(base_url=server.base_url, api_key="test")
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from typing_extensions import Self

FAULTS = ("429", "500", "hang", "garbage", "kill", "malformed", "html", "json_string", "no_choices", "message_null")
# 200 replies that are not chat completions: the status says success, the body says otherwise
INVALID_BODIES = {
    "html": ("text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
    "json_string": ("application/json", b'"upstream unavailable"'),
    "no_choices": ("application/json", b'{"id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": "m"}'),
    "message_null": ("application/json", (b'{"id": "chatcmpl-x", "object": "chat.completion", "created": 0, '
                                          b'"model": "m", "choices": [{"index": 0, "message": null}]}')),
}


def reply_for(prompt: str) -> str:
    """The deterministic, well-formed reply to `prompt` (no AU, no emotion words)."""
    h = hashlib.sha256(prompt.encode()).hexdigest()[:12]
    return f"Synthetic reply {h}: the facial features move in the described way."


class FakeOpenAIServer:
    def __init__(self, *, hang_s: float = 1.5):
        self.faults: deque[str] = deque()
        self.always_fault: str | None = None  # the fault of every request once `faults` is empty
        self.always_malformed: set[str] = set()
        self.hang_s = hang_s  # a "hang" sleeps this long before answering (beyond the client timeout)
        self.requests = 0  # every POST received, faulty or not
        self.served = Counter()  # prompt -> well-formed replies sent to a waiting client
        self.fault_log: list[str] = []
        self.auth_headers: list[str] = []  # kept only to check the key is sent; never printed
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _next_fault(self) -> str | None:
        with self._lock:
            self.requests += 1
            fault = self.faults.popleft() if self.faults else self.always_fault
            if fault:
                self.fault_log.append(fault)
            return fault

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                # headers and body go out as two writes: without NODELAY, Nagle + delayed ACK
                # add ~40 ms to every request
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None, *,
                      content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.auth_headers.append(self.headers.get("Authorization", ""))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, b'{"error": {"message": "not found"}}')
                prompt = "\n".join(m["content"] for m in body.get("messages", []))
                fault = server._next_fault()
                if fault == "429":
                    return self._send(429, b'{"error": {"message": "rate limited", "type": "rate"}}',
                                      {"Retry-After": "0"})
                if fault == "500":
                    return self._send(500, b'{"error": {"message": "boom"}}')
                if fault == "hang":
                    time.sleep(server.hang_s)
                if fault in INVALID_BODIES:
                    content_type, invalid = INVALID_BODIES[fault]
                    return self._send(200, invalid, content_type=content_type)
                if fault == "garbage":
                    return self._send(200, b'{"id": "x", "choices": [ this is not json')
                if fault == "kill":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "5000")
                    self.end_headers()
                    self.wfile.write(b'{"id": "chatcmpl-1", "choi')
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.close()
                    return
                malformed = fault == "malformed" or any(s in prompt for s in server.always_malformed)
                text = ("AU12 and AU6 are active, the person is happy." if malformed
                        else reply_for(prompt))
                if not malformed and fault != "hang":  # a hung reply reaches no client
                    with server._lock:
                        server.served[prompt] += 1
                usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())}
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                reply = {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
                         "model": body.get("model", "fake"),
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}],
                         "usage": usage}
                try:
                    self._send(200, json.dumps(reply).encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) before we answered

        return Handler


def unused_base_url() -> str:
    """The base URL of an endpoint that is down: a port of 127.0.0.1 nobody listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"

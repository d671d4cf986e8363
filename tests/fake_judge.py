"""A fake OpenAI-compatible judge server for tests: a ``ThreadingHTTPServer`` on a free port of
127.0.0.1 answering POST /v1/chat/completions with what a test scripts (a reply, an error status,
a stall, log-probs in OpenAI's format); it records every request and the most requests it held at
once."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def completion(text: str, logprobs: list | None = None) -> dict:
    """A chat.completion body as OpenAI's API and ``vllm serve`` write it."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
              "logprobs": None if logprobs is None else {"content": logprobs}}
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "judge", "choices": [choice],
            "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}}


def ok(text: str, logprobs: list | None = None, delay: float = 0.0):
    return 200, completion(text, logprobs), delay


def failure(status: int, delay: float = 0.0):
    return status, {"error": {"message": f"scripted {status}", "type": "server_error", "code": status}}, delay


class FakeServer:
    """``reply(body, n) -> (status, payload, delay_s)`` answers the n-th request (from 0)."""

    def __init__(self, port: int = 0):
        """``port``: 0 for a free one; an earlier server's, to stand in for it after it was stopped."""
        self.requests, self.lock = [], threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.release = threading.Event()  # set at teardown: a stalled handler stops waiting
        self.reply = lambda body, n: ok("Score: 3")
        self.http = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.http.daemon_threads = True
        self.http.fake = self
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def contents(self) -> list[str]:
        return [r["body"]["messages"][0]["content"] for r in self.requests]

    def close(self):
        self.release.set()
        self.http.shutdown()
        self.http.server_close()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        fake = self.server.fake
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with fake.lock:
            n = len(fake.requests)
            fake.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        status, payload, delay = fake.reply(body, n)
        if delay:
            fake.release.wait(delay)
        with fake.lock:  # before the answer leaves: the client cannot start the next request before this
            fake.in_flight -= 1
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on a stall
            pass

    def log_message(self, *args):
        pass



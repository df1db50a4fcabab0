"""An HTTP proxy in front of a test tracking server that answers some requests late: the server
has done the work, the client's answer comes ``delay_s`` later (a server that stores an upload
in S3 before answering, or one too loaded to answer in time)."""
from __future__ import annotations

import http.server
import threading
import time
import urllib.error
import urllib.request
from collections import Counter


class SlowProxy:
    def __init__(self, upstream: str, slow: tuple[str, str], delay_s: float, lose_answers: int = 0):
        """``slow``: (HTTP method, a part of the path) of the requests answered late. The first
        ``lose_answers`` of them get a 504 instead of the server's answer (a gateway that timed
        out while the server did the work)."""
        self.upstream, self.slow, self.delay_s, self.lose_answers = upstream, slow, delay_s, lose_answers
        self.requests: Counter = Counter()  # (method, path) -> count
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                proxy.requests[(self.command, self.path.split("?")[0])] += 1
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                req = urllib.request.Request(proxy.upstream + self.path, data=body, method=self.command,
                                             headers=headers)
                try:
                    with urllib.request.urlopen(req, timeout=60) as resp:
                        code, data, ctype = resp.status, resp.read(), resp.headers.get("Content-Type")
                except urllib.error.HTTPError as e:
                    code, data, ctype = e.code, e.read(), e.headers.get("Content-Type")
                if self.command == proxy.slow[0] and proxy.slow[1] in self.path:
                    time.sleep(proxy.delay_s)
                    if proxy.lose_answers > 0:
                        proxy.lose_answers -= 1
                        code, data = 504, b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "gateway timeout"}'
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype or "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up waiting
                    pass

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self, method: str, part: str) -> int:
        return sum(n for (m, path), n in self.requests.items() if m == method and part in path)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

"""The daemon's own HTTP endpoints: /metrics, /healthz and /readyz.

A small stdlib server on a thread (no web framework in the capture process):
- /healthz is 200 while the main loop's heartbeat is fresh, 503 when it is stuck;
- /readyz is 200 while streaming, or while standing by ready to take over;
- /metrics is the Prometheus exposition of the daemon's registry.
They carry no row data and need no token.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Probe = Callable[[], tuple[bool, dict[str, Any]]]


class HealthServer:
    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, health: Probe, ready: Probe
    ) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(owner.registry), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    ok, detail = (owner.health if path == "/healthz" else owner.ready)()
                    body = json.dumps({"status": "ok" if ok else "unavailable", **detail}).encode()
                    self._send(200 if ok else 503, body, "application/json")
                else:
                    self._send(404, b'{"error": "not found"}', "application/json")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return  # probes every few seconds would drown the logs

        self.registry = registry
        self.health = health
        self.ready = ready
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="cdc-health", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> HealthServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def heartbeat_probe(last_beat: Callable[[], float], max_age: float) -> Probe:
    def probe() -> tuple[bool, dict[str, Any]]:
        age = time.monotonic() - last_beat()
        return age <= max_age, {"heartbeat_age_seconds": round(age, 3)}

    return probe

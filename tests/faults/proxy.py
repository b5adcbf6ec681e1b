"""A small threaded TCP proxy on 127.0.0.1 that a test controls, to break the network
between the daemon and a PostgreSQL server on purpose.

Modes:

- ``forward()``: bytes flow both ways (also on connections held by a blackhole, which resume
  with their buffered bytes, like TCP after a partition heals);
- ``cut()``: every connection is reset and new ones are refused (the listening socket is
  closed; ``restore()`` binds the same port again);
- ``blackhole()``: connections stay open and new ones are accepted, but nothing is forwarded
  either way: the peers hear nothing, as behind a dead router or a hung server. Only an
  application-level timeout notices it: this proxy's kernel still acknowledges every segment,
  so TCP keepalives and ``tcp_user_timeout`` do not fire;
- ``restore()``: back to ``forward()``.

``dsn(base)`` rewrites a libpq key=value DSN to go through the proxy.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import struct
import threading
import time

_CHUNK = 65536


class _Pair:
    """One client connection and its upstream connection, pumped by two threads."""

    def __init__(self, proxy: Proxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.closed = threading.Event()

    def run(self) -> None:
        # A connection accepted during a blackhole is connected upstream only once restored.
        if not self.proxy._wait_forwarding(self.closed):
            self.close()
            return
        try:
            self.upstream = socket.create_connection((self.proxy.upstream_host, self.proxy.upstream_port), 10)
            self.upstream.settimeout(None)
        except OSError:
            self.close()
            return
        if self.closed.is_set():  # cut while connecting
            self.close()
            return
        threading.Thread(
            target=self._pump, args=(self.upstream, self.client), daemon=True, name="proxy-down"
        ).start()
        self._pump(self.client, self.upstream)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self.closed.is_set():
                if not self.proxy._wait_forwarding(self.closed):
                    break
                ready, _, _ = select.select([src], [], [], 0.1)
                if not ready:
                    continue
                data = src.recv(_CHUNK)
                if not data:
                    break
                # Read before a blackhole began: hold it until the network is back.
                if not self.proxy._wait_forwarding(self.closed):
                    break
                dst.sendall(data)
                self.proxy.bytes_forwarded += len(data)
        except (OSError, ValueError):
            pass
        self.close()

    def close(self, reset: bool = False) -> None:
        self.closed.set()
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                if reset:  # RST instead of FIN: what a failing network path looks like
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        self.proxy._forget(self)


class Proxy:
    """``Proxy(host, port).start()``; then ``cut()``, ``blackhole()``, ``restore()``, ``close()``."""

    def __init__(self, upstream_host: str, upstream_port: int, port: int = 0) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = port
        self.mode = "forward"
        self.bytes_forwarded = 0
        self.accepted = 0
        self._cond = threading.Condition()
        self._pairs: set[_Pair] = set()
        self._listener: socket.socket | None = None
        self._stopped = False

    # -- control -----------------------------------------------------------------
    def start(self) -> Proxy:
        self._listen()
        return self

    def dsn(self, base: str) -> str:
        """``base`` (a key=value DSN) with host and port pointing at this proxy."""
        text = re.sub(r"\bhost=\S+", "host=127.0.0.1", base)
        return re.sub(r"\bport=\S+", f"port={self.port}", text)

    def cut(self) -> None:
        """Reset every connection and refuse new ones until ``restore()``."""
        with self._cond:
            self.mode = "cut"
            listener, self._listener = self._listener, None
            pairs = list(self._pairs)
            self._cond.notify_all()
        if listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would leave the
            # socket listening until that accept() returns.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                listener.close()
        for pair in pairs:
            pair.close(reset=True)

    def blackhole(self) -> None:
        """Accept, but forward nothing either way, until ``restore()``."""
        with self._cond:
            self.mode = "blackhole"
            self._cond.notify_all()

    def restore(self) -> None:
        with self._cond:
            was_cut = self.mode == "cut"
            self.mode = "forward"
            self._cond.notify_all()
        if was_cut:
            self._listen()

    forward = restore

    def connections(self) -> int:
        with self._cond:
            return len(self._pairs)

    def close(self) -> None:
        self._stopped = True
        self.cut()

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------
    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 10
        while True:
            try:
                listener.bind(("127.0.0.1", self.port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    listener.close()
                    raise
                time.sleep(0.1)
        listener.listen(64)
        self.port = listener.getsockname()[1]
        with self._cond:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True, name="proxy-accept").start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by cut() or close()
            with self._cond:
                if self.mode == "cut" or self._stopped:
                    client.close()
                    continue
                pair = _Pair(self, client)
                self._pairs.add(pair)
                self.accepted += 1
            threading.Thread(target=pair.run, daemon=True, name="proxy-pair").start()

    def _wait_forwarding(self, closed: threading.Event) -> bool:
        """Block while blackholed; False when the pair should close."""
        with self._cond:
            while self.mode == "blackhole" and not closed.is_set():
                self._cond.wait(0.2)
            return self.mode == "forward" and not closed.is_set()

    def _forget(self, pair: _Pair) -> None:
        with self._cond:
            self._pairs.discard(pair)

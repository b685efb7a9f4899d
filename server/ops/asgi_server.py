"""An ASGI app (Starlette / FastAPI) served by uvicorn on a background thread, bounded:
the dashboard and the OpenAI-compatible API both run on it.

    server = AsgiServer(app, "127.0.0.1", 0, name="fedmoe-dashboard")   # listening when this returns
    server.url, server.port
    server.stop()                                                       # graceful, then closed

What bounds it (all uvicorn's own machinery; one event loop, no thread per connection):
- `idle_timeout`: a connection must send a whole request head within this many seconds of
  opening (or of its previous response); otherwise it is closed. uvicorn's
  `timeout_keep_alive` alone only starts after a first response, so a socket that never
  sends anything (or trickles a header a byte at a time) would stay open for ever:
  `IdleClosingH11Protocol` arms the same timer from the moment a connection is made.
- `max_connections`: uvicorn's `limit_concurrency`; requests beyond it are answered 503.
- TLS: uvicorn's `ssl_certfile` / `ssl_keyfile`; asyncio bounds the handshake (60 s).
- `stop()`: uvicorn's graceful shutdown (`grace` seconds for requests in flight).
"""

from __future__ import annotations

import socket
import ssl as ssl_lib
import threading
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

from fedmoe.server.ops.access import TLSFiles
from fedmoe.shared.errors import FedmoeError


class IdleClosingH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with the keep-alive timer also armed on a fresh connection,
    and not disarmed by bytes that do not complete a request head (slow-loris)."""

    def _arm_head_deadline(self) -> None:
        waiting_for = self.cycle  # the request (None: the first) whose successor must arrive in time

        def expire() -> None:
            if self.cycle is waiting_for and not self.transport.is_closing():
                self.timeout_keep_alive_handler()

        self._head_deadline = self.loop.call_later(self.timeout_keep_alive, expire)

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm_head_deadline()  # before super(): it may start a pipelined request's cycle
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        deadline = getattr(self, "_head_deadline", None)
        if deadline is not None:
            deadline.cancel()
        super().connection_lost(exc)


def listen(host: str, port: int, what: str) -> socket.socket:
    """A bound TCP socket (IPv6 if `host` is), so the port is known before the server runs."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise FedmoeError(f"{what} cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class AsgiServer:
    """`app` on uvicorn, on a daemon thread: `host`, `port`, `scheme`, `url`, `stop()`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, tls: TLSFiles | None = None,
                 idle_timeout: float = 10.0, max_connections: int = 64, grace: float = 2.0,
                 name: str = "fedmoe-http", what: str = "the HTTP server"):
        import uvicorn

        if max_connections < 1 or idle_timeout <= 0:
            raise FedmoeError(f"{what}: max_connections must be >= 1 and idle_timeout > 0")
        sock = listen(host, port, what)
        self.host, self.port = host, sock.getsockname()[1]
        self.scheme = "https" if tls else "http"
        ssl = {"ssl_certfile": tls.cert, "ssl_keyfile": tls.key} if tls else {}
        config = uvicorn.Config(app, http=IdleClosingH11Protocol, log_level="warning", lifespan="off",
                                access_log=False, server_header=False, timeout_keep_alive=idle_timeout,
                                timeout_graceful_shutdown=grace, limit_concurrency=max_connections, **ssl)
        try:
            config.load()  # here, not on the thread: a bad certificate or key is a one-line error
        except (OSError, ssl_lib.SSLError) as exc:
            sock.close()
            raise FedmoeError(f"{what}: TLS certificate/key not usable: {getattr(exc, 'strerror', None) or exc}") from None
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                sock.close()
                raise FedmoeError(f"{what} did not start on {host}:{self.port}")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=timeout)

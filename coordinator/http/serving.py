"""Serving an app with uvicorn: `bind` the port first, `run` until a signal, or a
`BackgroundServer` in a thread of this process."""

from __future__ import annotations

import errno
import signal
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """The server's socket, listening: taken before the model loads, so a busy port fails
    in a second rather than after minutes of loading, and nothing the load starts (Ray,
    workers, ZeroMQ) can take the port meanwhile. Listening, not just bound: Linux lets
    another SO_REUSEADDR socket bind a port that no socket listens on. Connections made
    meanwhile wait in its queue until `run` serves them. port=0 takes a free port (see
    `.getsockname()`)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)  # as uvicorn
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's backlog
    except OSError as e:  # socket.gaierror too: a host name that does not resolve
        sock.close()
        raise ValueError(f"cannot bind {host}:{port}: {e.strerror}"
                         + (" (is another server on it? pick another with --port)"
                            if e.errno == errno.EADDRINUSE else "")) from None
    return sock


class _Stopped(Exception):
    pass


def _stopped(sig, frame):
    raise _Stopped(sig)


def run(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve `app` on `sock` (from `bind`) until SIGINT or SIGTERM, then return (so the
    caller can stop the workers). uvicorn stops gracefully on either signal and then
    raises it again with the handlers it found; the handler set here turns that into a
    plain return."""
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(uvicorn.Config(app, log_level=log_level,
                                      timeout_graceful_shutdown=5)).run(sockets=[sock])
    except _Stopped:
        pass
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class BackgroundServer:
    """`app` served from a thread of this process (notebooks, tests): `.url`, `.stop()`.
    port=0 picks a free port."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning") -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port,
                                                    log_level=log_level,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {host}:{port}")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

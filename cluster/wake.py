"""A wake-up for a thread that sleeps in a ZeroMQ poll: another thread's `set` makes the
poll on `fd` return at once (the self-pipe trick; zmq.Poller takes a plain file descriptor
beside its sockets). The coordinator's scheduler polls its results socket and this, so a
request arriving at an idle pipeline starts at once, not when the poll times out; a
worker's loop polls its step socket and this, for calls that must run on its thread."""

from __future__ import annotations

import os
import threading


class Wake:
    def __init__(self) -> None:
        self.fd, self._w = os.pipe()  # poll `fd` for POLLIN
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self._lock = threading.Lock()  # no write after close: the fd may be reused by then
        self.closed = False

    def set(self) -> None:
        """Wake the poller (from any thread; never blocks; nothing once closed)."""
        with self._lock:
            if self.closed:
                return
            try:
                os.write(self._w, b"\0")
            except BlockingIOError:  # the pipe is full: a wake-up is already waiting
                pass

    def clear(self) -> None:
        """Take every pending wake-up (the polling thread, once woken)."""
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                os.close(self.fd)
                os.close(self._w)

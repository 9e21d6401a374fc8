"""Encrypted, authenticated ZeroMQ links between the nodes of one cluster (CURVE).

The coordinator makes one key pair (`LinkKeys.generate`) and hands it to its workers over
Ray. Every socket that binds is a CURVE server with it, behind a ZAP handler that admits
only that public key (`Guard`, which counts and logs refused handshakes); every socket that
connects is a CURVE client with the same pair (`client`). `keys=None` is plain TCP, for a
trusted single machine (`llm-shard serve --no-encrypt`, `LLM(encrypt=False)`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import zmq

log = logging.getLogger("llm_shard.links")

_REFUSALS = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
             | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


@dataclass(frozen=True)
class LinkKeys:
    """The cluster's CURVE key pair, Z85-encoded (40 ASCII characters each)."""

    public: str
    secret: str

    @classmethod
    def generate(cls) -> LinkKeys:
        if not zmq.has("curve"):
            raise RuntimeError("this libzmq has no CURVE support: encrypted links need it "
                               "(or turn encryption off for a trusted single machine)")
        public, secret = zmq.curve_keypair()
        return cls(public.decode(), secret.decode())

    def __repr__(self) -> str:  # never print the secret
        return f"LinkKeys(public={self.public!r})"


def client(sock: zmq.Socket, keys: LinkKeys | None) -> zmq.Socket:
    """Make `sock` (before connect) a CURVE client of the cluster's servers."""
    if keys is not None:
        sock.curve_serverkey = keys.public.encode()
        sock.curve_publickey = keys.public.encode()
        sock.curve_secretkey = keys.secret.encode()
    return sock


class Guard:
    """The CURVE server side for one ZeroMQ context: a ZAP handler admitting the cluster's
    key only, and a monitor per bound socket that logs refused handshakes."""

    def __init__(self, ctx: zmq.Context, keys: LinkKeys | None, name: str) -> None:
        self.ctx, self.keys, self.name = ctx, keys, name
        self.refused = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._monitors: list[threading.Thread] = []
        self._auth = None
        if keys is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("llm_shard.links.zap"))
            self._auth.start()
            self._auth.configure_curve_callback("*", credentials_provider=self)

    # ZAP: called by the authenticator thread for each CURVE client's public key
    def callback(self, domain: str, key: bytes) -> bool:
        if key == self.keys.public.encode():
            return True
        log.warning("%s: refused a CURVE client with an unknown key", self.name)
        return False

    def server(self, sock: zmq.Socket) -> zmq.Socket:
        """Make `sock` (before bind) a CURVE server, and watch its handshakes."""
        if self.keys is None:
            return sock
        sock.curve_server = True
        sock.curve_publickey = self.keys.public.encode()
        sock.curve_secretkey = self.keys.secret.encode()
        monitor = sock.get_monitor_socket(_REFUSALS)
        t = threading.Thread(target=self._watch, args=(monitor,), daemon=True,
                             name=f"{self.name}-handshakes")
        t.start()
        self._monitors.append(t)
        return sock

    def _watch(self, monitor: zmq.Socket) -> None:
        from zmq.utils.monitor import recv_monitor_message

        try:
            while not self._stop.is_set():
                if not monitor.poll(100):
                    continue
                event = recv_monitor_message(monitor)
                with self._lock:
                    self.refused += 1
                log.warning("%s: refused a connection from %s (handshake failed: %s)",
                            self.name, event.get("endpoint", b"?").decode(errors="replace"),
                            _event_name(event["event"]))
        except zmq.ZMQError:
            pass
        finally:
            monitor.close(linger=0)

    def close(self) -> None:
        """Stop the monitors and the ZAP handler (before the context terminates)."""
        self._stop.set()
        for t in self._monitors:
            t.join(timeout=2)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


def _event_name(event: int) -> str:
    for name in ("NO_DETAIL", "PROTOCOL", "AUTH"):
        if event == getattr(zmq, f"EVENT_HANDSHAKE_FAILED_{name}"):
            return name.lower().replace("_", " ")
    return str(event)

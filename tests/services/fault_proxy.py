"""A loopback TCP proxy that cuts or stalls server responses, to test the client's recovery."""

from __future__ import annotations

import socket
import struct
import threading


class FaultProxy:
    """Forwards 127.0.0.1:<port> to the server; the i-th connection follows ``faults[i]``.

    A fault is ``("reset", n)``: forward n response bytes then reset both sides, ``("stall", n)``:
    forward n bytes then send nothing more until the proxy closes, or None: forward everything.
    Connections past the list are forwarded untouched. ``requests`` keeps each request's head.
    """

    def __init__(self, upstream_port: int, faults: list[tuple[str, int] | None]):
        self.upstream_port = upstream_port
        self.faults = list(faults)
        self.requests: list[bytes] = []
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.listener.close()
        for sock in self.sockets:
            _close(sock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        number = 0
        while not self.stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            fault = self.faults[number] if number < len(self.faults) else None
            number += 1
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.sockets += [client, upstream]
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._responses, args=(upstream, client, fault), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        first = True
        try:
            while data := client.recv(65536):
                if first:  # a request head fits in one segment on loopback
                    self.requests.append(data)
                    first = False
                upstream.sendall(data)
        except OSError:
            pass

    def _responses(self, upstream: socket.socket, client: socket.socket, fault) -> None:
        sent = 0
        limit = fault[1] if fault else None
        try:
            while data := upstream.recv(65536):
                if limit is not None and sent + len(data) >= limit:
                    client.sendall(data[: limit - sent])
                    if fault[0] == "reset":
                        _reset(client)
                        _reset(upstream)
                        return
                    self.stop.wait()
                    return
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            _close(client)


def _reset(sock: socket.socket) -> None:
    # SO_LINGER 0 makes the final close send RST, as a dropped connection would.
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _close(sock)


def _close(sock: socket.socket) -> None:
    # shutdown first: close alone does not wake the other thread blocked in recv on this socket.
    for step in (lambda: sock.shutdown(socket.SHUT_RDWR), sock.close):
        try:
            step()
        except OSError:
            pass

"""TLS helpers the tests share."""

import socket
import ssl
import threading


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str = "localhost") -> None:
    """One TLS handshake over a socket pair, the client asking for ``hostname``; raises the
    client's error, or else the server's."""
    left, right = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server.wrap_socket(right, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(left, server_hostname=hostname) as tls:
            tls.sendall(b"x")
    finally:
        thread.join(5)
    if errors:
        raise errors[0]

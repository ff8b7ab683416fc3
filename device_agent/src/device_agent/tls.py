"""The device's TLS context: the broker's certificate always verified, TLS 1.2 or newer.

The agent depends on nothing of the backend, so this is its own small helper rather than the
services' ``services.common.tls``; both refuse to build a context that skips verification. One
context serves every connection a process opens: a fleet of 10,000 simulated devices loads
its CA bundle once, and each reconnection of a single agent reuses the one it built.
"""

import ssl
from typing import Any


class _ClosingSSLSocket(ssl.SSLSocket):
    """An SSLSocket that closes itself when its handshake fails: paho's connect drops the
    socket of a refused handshake without closing it, leaving the descriptor to the garbage
    collector (and a ResourceWarning) on every attempt."""

    def do_handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().do_handshake(*args, **kwargs)
        except (OSError, ValueError):
            self.close()
            raise


def client_context(
    ca_file: str, *, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """A context that verifies the broker's certificate and host name against ``ca_file``,
    presenting ``cert_file`` (its key in ``key_file``, or in ``cert_file`` itself) as the
    device's own certificate when given (mutual TLS).

    Raises OSError when a file cannot be read and ssl.SSLError when one is not what it
    should be (a key that does not match the certificate, a bundle with no certificate)."""
    if key_file is not None and cert_file is None:
        raise ValueError("a device key without its certificate")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.sslsocket_class = _ClosingSSLSocket
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context

"""TLS contexts for Galvani's clients: verification always on, TLS 1.2 or newer.

Every client of the broker and the API (the workers' subscriber, the paho publishers, the
device agent and the fleet simulator) builds its context here, so that no client can be
configured to skip verifying the server, and one context is shared by all the connections a
process opens (a fleet of 10,000 devices loads its CA bundle once).
"""

import ssl
from pathlib import Path


def client_context(
    ca_file: Path | str | None,
    *,
    cert_file: Path | str | None = None,
    key_file: Path | str | None = None,
) -> ssl.SSLContext:
    """A client context that verifies the server's certificate and host name against
    ``ca_file`` (the system's trust store when None), presenting ``cert_file`` and
    ``key_file`` as the client's own certificate when given (mutual TLS)."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=None if ca_file is None else str(ca_file)
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        context.load_cert_chain(str(cert_file), None if key_file is None else str(key_file))
    elif key_file is not None:
        raise ValueError("a client key without its certificate")
    return context


def server_context(
    cert_file: Path | str, key_file: Path | str, *, client_ca_file: Path | str | None = None
) -> ssl.SSLContext:
    """A server context presenting ``cert_file``; with ``client_ca_file`` it asks clients
    for a certificate and verifies it when one is sent."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file))
    if client_ca_file is not None:
        context.load_verify_locations(cafile=str(client_ca_file))
        context.verify_mode = ssl.CERT_OPTIONAL
    return context

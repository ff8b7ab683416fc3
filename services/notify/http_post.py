"""The HTTP transport every HTTP channel kind shares: one POST to a checked address.

The connection goes to an address the URL check accepted (:class:`CheckedUrl`), not to a second
resolution of the name, so a name re-pointed at 127.0.0.1 between the check and the connect
(DNS rebinding) reaches nothing it should not; TLS still verifies the certificate for the name
(SNI and the Host header carry the name too). Redirects are never followed: a 3xx is a failed
attempt, so a receiver cannot bounce the dispatcher to another address.
"""

import http.client
import socket
import ssl
import urllib.parse

from services.common.outbound_urls import CheckedUrl

USER_AGENT = "Galvani-Notify/1"
# Enough of a receiver's error answer to say what went wrong (it is shown to the brand in the
# delivery log), never more.
ERROR_TEXT_CHARS = 200


class Outcome:
    """What one attempt gave: delivered (a 2xx answer), or the error and status to record;
    ``final`` when retrying cannot succeed (the receiver refused this very request for good:
    PagerDuty's 400, an SMTP 5xx), so the row fails at once rather than at the give-up time."""

    __slots__ = ("delivered", "error", "final", "status_code")

    def __init__(
        self,
        delivered: bool,
        status_code: int | None = None,
        error: str | None = None,
        *,
        final: bool = False,
    ) -> None:
        self.delivered = delivered
        self.status_code = status_code
        self.error = error
        self.final = final


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Plain HTTP to ``address``, with ``host`` in the Host header."""

    def __init__(self, target: CheckedUrl, timeout_s: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout_s)
        self._address = str(target.addresses[0])

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """TLS to ``address``, verifying the certificate for ``host`` (SNI and Host too)."""

    def __init__(self, target: CheckedUrl, timeout_s: float, tls: ssl.SSLContext) -> None:
        super().__init__(target.host, target.port, timeout=timeout_s, context=tls)
        self._address = str(target.addresses[0])
        self._tls = tls

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


def send(
    target: CheckedUrl,
    body: bytes,
    headers: dict[str, str],
    *,
    timeout_s: float,
    tls: ssl.SSLContext,
) -> Outcome:
    """POST ``body`` with ``headers`` (``User-Agent`` and ``Content-Type: application/json``
    added unless given) to ``target``'s first checked address; a 2xx answer is delivered."""
    connection: http.client.HTTPConnection
    if target.scheme == "https":
        connection = _PinnedHTTPSConnection(target, timeout_s, tls)
    else:
        connection = _PinnedHTTPConnection(target, timeout_s)
    parts = urllib.parse.urlsplit(target.url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    sent = {"User-Agent": USER_AGENT, "Content-Type": "application/json", **headers}
    try:
        connection.request("POST", path, body=body, headers=sent)
        response = connection.getresponse()
        answer = response.read(ERROR_TEXT_CHARS * 4)
    except TimeoutError:
        return Outcome(False, error=f"no answer within {timeout_s:g} s")
    except (OSError, http.client.HTTPException) as exc:
        return Outcome(False, error=f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_CHARS])
    finally:
        connection.close()
    if 200 <= response.status < 300:
        return Outcome(True, status_code=response.status)
    text = answer.decode("utf-8", "replace")[:ERROR_TEXT_CHARS]
    return Outcome(False, status_code=response.status, error=f"HTTP {response.status}: {text}")

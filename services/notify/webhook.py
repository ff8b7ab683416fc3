"""The webhook delivery: one signed POST of a notification's payload to a channel's URL.

The request (docs/api.md): the payload as JSON, ``Galvani-Idempotency-Key``,
``Galvani-Timestamp`` (unix seconds) and ``Galvani-Signature: v1=<hex HMAC-SHA256(secret,
"<timestamp>." + body)>``, the scheme of Stripe's and GitHub's webhooks: the receiver checks the
signature over the exact bytes it got and refuses an old timestamp (a replay). The transport
(the checked address, no redirects) is :mod:`services.notify.http_post`'s.
"""

import hashlib
import hmac
import ssl
import time

from services.common.outbound_urls import CheckedUrl
from services.notify import http_post
from services.notify.http_post import Outcome

__all__ = ["Outcome", "post", "sign", "signed_headers"]


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``Galvani-Signature`` header's value for ``body`` sent at ``timestamp``."""
    message = str(timestamp).encode() + b"." + body
    return "v1=" + hmac.new(secret, message, hashlib.sha256).hexdigest()


def signed_headers(body: bytes, *, secret: bytes, idempotency_key: str) -> dict[str, str]:
    """The Galvani headers of a webhook request carrying ``body``, signed now."""
    timestamp = int(time.time())
    return {
        "Content-Type": "application/json",
        "Galvani-Idempotency-Key": idempotency_key,
        "Galvani-Timestamp": str(timestamp),
        "Galvani-Signature": sign(secret, timestamp, body),
    }


def post(
    target: CheckedUrl,
    body: bytes,
    *,
    secret: bytes,
    idempotency_key: str,
    timeout_s: float,
    tls: ssl.SSLContext,
) -> Outcome:
    """POST ``body`` to ``target`` signed with ``secret``."""
    headers = signed_headers(body, secret=secret, idempotency_key=idempotency_key)
    return http_post.send(target, body, headers, timeout_s=timeout_s, tls=tls)

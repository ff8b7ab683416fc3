"""The API's request metrics: count and latency by route template (never by raw path, so ids
do not become label values), method and status."""

import time
from typing import Final

from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS: Final = Counter(
    "galvani_api_requests_total", "Requests answered", ["route", "method", "status"]
)
LATENCY: Final = Histogram(
    "galvani_api_request_seconds",
    "Time to the response's first byte (a stream counts until its headers)",
    ["route", "method"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)


class RequestMetrics:
    """Pure ASGI middleware (no response buffering, so event streams flow through)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        recorded = False

        async def send_and_record(message: Message) -> None:
            nonlocal recorded
            if message["type"] == "http.response.start" and not recorded:
                recorded = True
                route = scope.get("route")
                template = getattr(route, "path", None) or "unmatched"
                method = scope["method"]
                REQUESTS.labels(template, method, str(message["status"])).inc()
                LATENCY.labels(template, method).observe(time.perf_counter() - started)
            await send(message)

        await self.app(scope, receive, send_and_record)


# Set by the revocation list's renewal (services/api/revocation_renewal.py) each time it looks;
# absent where the installation has no device CA.
DEVICE_CRL_NEXT_UPDATE: Final = Gauge(
    "galvani_api_device_crl_next_update_seconds",
    "When the device CA's newest revocation list in the broker's trust directory expires (Unix"
    " seconds): past it, the broker refuses every certificate device",
)

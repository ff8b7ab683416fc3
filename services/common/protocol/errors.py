"""The one exception of protocol v1: what a topic or payload that breaks the contract raises."""

from services.common.errors import GalvaniError


class ProtocolError(GalvaniError):
    """A topic or payload that breaks protocol v1; ``reason`` is a stable short code."""

    def __init__(self, reason: str, detail: str, path: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.path = path

"""Logging set-up shared by the services: one line per record, to stderr."""

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Configure the root logger once for a service process."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, force=True)

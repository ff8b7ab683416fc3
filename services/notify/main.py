"""The notification dispatcher: ``python -m services.notify.main``."""

import logging

from prometheus_client import start_http_server

from services.common.logs import configure_logging
from services.common.secret_box import SecretBox
from services.common.worker import stop_on_signals
from services.notify.dispatcher import Dispatcher
from services.notify.settings import NotifySettings

log = logging.getLogger("galvani.notify")


def main() -> None:
    """Deliver notifications from the outbox until SIGTERM or SIGINT."""
    settings = NotifySettings()
    configure_logging(settings.log_level)
    stop = stop_on_signals()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.metrics_host)
    secrets = SecretBox.from_file(settings.secret_key_path())
    log.info("dispatcher started (%d workers)", settings.workers)
    Dispatcher(settings, secrets).run(stop)


if __name__ == "__main__":
    main()

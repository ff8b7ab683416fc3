"""The NATS cluster's auth-callout responder: ``python -m services.broker_access.main``."""

import logging
from collections.abc import Callable

from prometheus_client import start_http_server

from services.broker_access.access import Authorizer, ServicePasswords
from services.broker_access.issuer import load_issuer
from services.broker_access.responder import DeviceLookup, Responder
from services.broker_access.settings import BrokerAccessSettings
from services.common.broker.nats_client import NatsClient
from services.common.logs import configure_logging
from services.common.worker import stop_on_signals

log = logging.getLogger("galvani.broker_access")


def serving(settings: BrokerAccessSettings) -> Callable[[], None]:
    """What to do once the responder has subscribed: open the metrics endpoint (if any)."""

    def opened() -> None:
        if settings.metrics_port:
            start_http_server(settings.metrics_port, addr=settings.metrics_host)

    return opened


def main() -> None:
    """Answer the cluster's authorization requests until SIGTERM or SIGINT."""
    settings = BrokerAccessSettings()
    configure_logging(settings.log_level)
    stop = stop_on_signals()
    issuer = load_issuer(settings.issuer_seed_path())
    lookup = DeviceLookup(settings.database_url.get_secret_value())
    authorizer = Authorizer(lookup, ServicePasswords(settings.service_dir()))
    client = NatsClient(
        settings.nats_servers(),
        user=settings.mqtt_username,
        password=settings.mqtt_password.get_secret_value(),
        tls=settings.mqtt_tls_context(),
        name=settings.client_name(),
    )
    log.info(
        "auth-callout responder %s started (issuer %s)", settings.client_name(), issuer.public_key
    )
    try:
        # The metrics endpoint opens once the responder serves: `make run-cluster` waits on it.
        Responder(client, authorizer, issuer).run(stop, on_serving=serving(settings))
    finally:
        lookup.close()


if __name__ == "__main__":
    main()

"""The broker seam: which engine carries device traffic, and what the workers need from it.

``mosquitto`` is the single-machine default (one Mosquitto, MQTT 5, shared subscriptions);
``nats`` is the clustered engine (NATS 2.10 with JetStream and its MQTT 3.1.1 gateway).
"""

from enum import StrEnum


class BrokerKind(StrEnum):
    """The engine the services talk to (``GALVANI_BROKER``)."""

    MOSQUITTO = "mosquitto"
    NATS = "nats"

"""The MQTT topic layout of protocol v1 (protocol.md, "Topics"): the one place the backend
spells it. Every topic is ``galvani/v1/d/{device_id}/{channel}``."""

from typing import Final

DEVICE_TOPIC_ROOT: Final = "galvani/v1/d"

# What devices publish (device to cloud), in the order protocol.md lists them.
DEVICE_CHANNELS: Final = ("telemetry", "events", "state", "presence")
# What the cloud publishes to one device.
CONFIG_CHANNEL: Final = "config"
ACK_CHANNEL: Final = "ack"


def device_topic(device_id: str, channel: str) -> str:
    """The topic of ``channel`` for ``device_id``."""
    return f"{DEVICE_TOPIC_ROOT}/{device_id}/{channel}"


def device_prefix(device_id: str) -> str:
    """The topic prefix every channel of ``device_id`` starts with (no trailing slash)."""
    return f"{DEVICE_TOPIC_ROOT}/{device_id}"


def every_device(channel: str) -> str:
    """The filter for ``channel`` of every device (a single-level wildcard for the id)."""
    return f"{DEVICE_TOPIC_ROOT}/+/{channel}"


def acl_pattern(channel: str) -> str:
    """Mosquitto's ACL pattern for ``channel`` of the connecting device (``%u``: its username,
    which is its device id)."""
    return f"{DEVICE_TOPIC_ROOT}/%u/{channel}"


def shared_filters(group: str, channels: tuple[str, ...] = DEVICE_CHANNELS) -> tuple[str, ...]:
    """The MQTT 5 shared-subscription filters of one worker group, one per channel: the
    broker deals each message to one member of ``group``."""
    return tuple(f"$share/{group}/{every_device(channel)}" for channel in channels)

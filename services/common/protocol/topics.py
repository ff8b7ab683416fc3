"""The MQTT topic layout of protocol v1 (protocol.md, "Topics"): the one place the backend
spells it. Every topic is ``galvani/v1/d/{device_id}/{channel}``; the device agent spells it
on its own, and ``protocol/vectors/topics.json`` holds both sides to the same topics."""

import re
from typing import Final

from services.common.protocol.enums import Channel
from services.common.protocol.errors import ProtocolError

DEVICE_TOPIC_ROOT: Final = "galvani/v1/d"
TOPIC_PREFIX: Final = f"{DEVICE_TOPIC_ROOT}/"
# Never / + # % or spaces: they would break the broker's pattern ACLs.
DEVICE_ID_PATTERN: Final = r"^[a-z0-9][a-z0-9-]{2,63}$"

# What devices publish (device to cloud), in the order protocol.md lists them.
DEVICE_CHANNELS: Final = ("telemetry", "events", "state", "presence")
# What the cloud publishes to one device.
CONFIG_CHANNEL: Final = "config"
ACK_CHANNEL: Final = "ack"

_DEVICE_ID: Final = re.compile(DEVICE_ID_PATTERN)


def device_topic(device_id: str, channel: str) -> str:
    """The topic of ``channel`` for ``device_id``."""
    return f"{TOPIC_PREFIX}{device_id}/{channel}"


def device_prefix(device_id: str) -> str:
    """The topic prefix every channel of ``device_id`` starts with (no trailing slash)."""
    return f"{TOPIC_PREFIX}{device_id}"


def every_device(channel: str) -> str:
    """The filter for ``channel`` of every device (a single-level wildcard for the id)."""
    return device_topic("+", channel)


def acl_pattern(channel: str) -> str:
    """Mosquitto's ACL pattern for ``channel`` of the connecting device (``%u``: its username,
    which is its device id)."""
    return device_topic("%u", channel)


def shared_filters(group: str, channels: tuple[str, ...] = DEVICE_CHANNELS) -> tuple[str, ...]:
    """The MQTT 5 shared-subscription filters of one worker group, one per channel: the
    broker deals each message to one member of ``group``."""
    return tuple(f"$share/{group}/{every_device(channel)}" for channel in channels)


def parse_topic(topic: str) -> tuple[str, Channel]:
    """Split ``galvani/v1/d/{device_id}/{channel}`` into the device id and channel."""
    if not topic.startswith(TOPIC_PREFIX):
        raise ProtocolError("bad_topic", f"topic does not start with {TOPIC_PREFIX!r}")
    device_id, slash, channel = topic[len(TOPIC_PREFIX) :].partition("/")
    if not slash or _DEVICE_ID.fullmatch(device_id) is None:
        raise ProtocolError("bad_topic", "topic does not name a valid device id")
    if "/" in channel:
        raise ProtocolError("bad_topic", "topic has levels after the channel")
    try:
        return device_id, Channel(channel)
    except ValueError:
        raise ProtocolError("unknown_channel", "topic names no protocol v1 channel") from None

"""Stored acks: after a batch commits, each device is told which of its seqs are stored.

The broker's PUBACK only says the broker holds a message, in memory: Mosquitto writes its
state to disk every ``autosave_interval`` seconds, so a broker killed -9 or losing power
forgets messages it acknowledged since its last save, and a full queue drops them. A device
that deleted its outbox row on PUBACK would have lost them. So a device keeps every message
until this ack, which ingest publishes only after the transaction holding the message has
committed (protocol.md, channel ``ack``). Until then the device resends on every reconnect
and after a timeout; the database stores a resent message once, by ``(device_id, seq)``, and
it is acknowledged again.

A message counts as stored when the batch that held it committed, whatever the outcome: new,
already stored, recorded as a conflict, or kept as a dead letter (resending a payload the
backend refused would only refuse it again). Presence carries no seq and is never in an
outbox, so it is never acknowledged.
"""

import json
from collections.abc import Iterable, Sequence
from typing import Final

from services.common.protocol import ACK_CHANNEL, INT64_MAX, Channel, device_topic
from services.common.subscriber import Inbound
from services.ingest.decode import DeadLetter, Decoded, EventIn, StateIn, TelemetryIn

OUTBOX_CHANNELS: Final = frozenset({Channel.TELEMETRY, Channel.EVENTS, Channel.STATE})


def ack_topic(device_id: str) -> str:
    """The topic on which ``device_id`` hears which of its seqs are stored."""
    return device_topic(device_id, ACK_CHANNEL)


def stored_seqs(inbound: Sequence[Inbound], decoded: Sequence[Decoded]) -> dict[str, list[int]]:
    """The seqs of a committed batch, by device, in the order they arrived."""
    seqs: dict[str, list[int]] = {}
    for raw, item in zip(inbound, decoded, strict=True):
        if isinstance(item, TelemetryIn):
            device_id, seq = item.device_id, item.seq
        elif isinstance(item, EventIn):
            device_id, seq = item.device_id, item.event.seq
        elif isinstance(item, StateIn):
            device_id, seq = item.device_id, item.state.seq
        elif isinstance(item, DeadLetter):
            found = _dead_letter_seq(item, raw.payload)
            if found is None:
                continue
            device_id, seq = found
        else:
            continue
        seqs.setdefault(device_id, []).append(seq)
    return seqs


def seq_ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """``seqs`` as sorted, inclusive, non-overlapping ranges: [3, 1, 2, 7] -> [(1, 3), (7, 7)]."""
    ranges: list[tuple[int, int]] = []
    for seq in sorted(set(seqs)):
        if ranges and ranges[-1][1] == seq - 1:
            ranges[-1] = (ranges[-1][0], seq)
        else:
            ranges.append((seq, seq))
    return ranges


def ack_payload(seqs: Iterable[int]) -> bytes:
    """The ``ack`` message for ``seqs``: ``{"v":1,"seqs":[[first,last],...]}``."""
    body = ",".join(f"[{first},{last}]" for first, last in seq_ranges(seqs))
    return f'{{"v":1,"seqs":[{body}]}}'.encode()


def stored_acks(inbound: Sequence[Inbound], decoded: Sequence[Decoded]) -> list[tuple[str, bytes]]:
    """One ``(topic, payload)`` ack per device with seqs in a committed batch."""
    return [
        (ack_topic(device_id), ack_payload(seqs))
        for device_id, seqs in stored_seqs(inbound, decoded).items()
    ]


def _dead_letter_seq(letter: DeadLetter, payload: bytes) -> tuple[str, int] | None:
    """The device and seq of a dead letter, when its topic named a device's outbox channel
    (presence is never in an outbox) and its payload is a JSON object with a seq the
    protocol allows (a device refuses a whole ack naming one out of range)."""
    if letter.device_id is None or letter.channel not in OUTBOX_CHANNELS:
        return None
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    seq = body.get("seq") if isinstance(body, dict) else None
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= INT64_MAX:
        return None
    return letter.device_id, seq

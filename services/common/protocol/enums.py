"""The enumerations of protocol v1. New values may be added within v1; none may be removed."""

from enum import StrEnum


class Channel(StrEnum):
    """The last topic level: what a message carries."""

    TELEMETRY = "telemetry"
    EVENTS = "events"
    STATE = "state"
    PRESENCE = "presence"
    CONFIG = "config"


class Mode(StrEnum):
    """What a session runs: the three treatment modes, and SAFE, the one fault rules leave open."""

    LIFT = "LIFT"
    TIGHTEN = "TIGHTEN"
    INFUSE = "INFUSE"
    SAFE = "SAFE"


class Waveform(StrEnum):
    """The output shape of a mode: alternating monophasic pulses, or direct current."""

    MONO_ALT = "mono_alt"
    DC = "dc"


class EventType(StrEnum):
    """The ``type`` tag of an ``events`` payload."""

    SESSION_START = "session_start"
    SESSION_END = "session_end"
    FAULT = "fault"
    REBOOT = "reboot"
    USER_REPORT = "user_report"
    CHARGING = "charging"


class EndReason(StrEnum):
    """Why a session ended (``session_end.reason``)."""

    COMPLETED = "completed"
    USER_STOPPED = "user_stopped"
    AUTO_SHUTOFF = "auto_shutoff"
    FAULT = "fault"
    LOW_BATTERY = "low_battery"
    NO_CONTACT = "no_contact"


class FaultCode(StrEnum):
    """What the firmware cut output for (``fault.code``)."""

    OVERCURRENT = "overcurrent"
    DC_OFFSET = "dc_offset"
    SHORT_CIRCUIT = "short_circuit"
    OVERTEMP_ELECTRODE = "overtemp_electrode"
    OVERTEMP_BATTERY = "overtemp_battery"
    BROWNOUT = "brownout"
    OUTPUT_WHILE_CHARGING = "output_while_charging"
    WATCHDOG = "watchdog"


class RebootReason(StrEnum):
    """Why the device restarted (``reboot.reason``); watchdog, brownout and panic are unexpected."""

    POWER_ON = "power_on"
    WATCHDOG = "watchdog"
    BROWNOUT = "brownout"
    FIRMWARE_UPDATE = "firmware_update"
    PANIC = "panic"


class ReportKind(StrEnum):
    """What a user reported about a session (``user_report.kind``)."""

    REDNESS = "redness"
    BURN = "burn"
    DISCOMFORT = "discomfort"
    OTHER = "other"


class ConfigStatus(StrEnum):
    """What a device did with the last mode table (``state.config.status``)."""

    APPLIED = "applied"
    REJECTED = "rejected"


class RejectionReason(StrEnum):
    """Why a device refused a mode table (``state.config.reason``)."""

    BAD_SIGNATURE = "bad_signature"
    STALE_VERSION = "stale_version"
    OUTSIDE_ENVELOPE = "outside_envelope"
    EXPIRED = "expired"
    MALFORMED = "malformed"
    # Added in v1: the table is signed for another device, or names none.
    WRONG_DEVICE = "wrong_device"
    UNBOUND_TABLE = "unbound_table"

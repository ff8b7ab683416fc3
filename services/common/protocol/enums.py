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
    LIFT = "LIFT"
    TIGHTEN = "TIGHTEN"
    INFUSE = "INFUSE"
    SAFE = "SAFE"


class Waveform(StrEnum):
    MONO_ALT = "mono_alt"
    DC = "dc"


class EventType(StrEnum):
    SESSION_START = "session_start"
    SESSION_END = "session_end"
    FAULT = "fault"
    REBOOT = "reboot"
    USER_REPORT = "user_report"
    CHARGING = "charging"


class EndReason(StrEnum):
    COMPLETED = "completed"
    USER_STOPPED = "user_stopped"
    AUTO_SHUTOFF = "auto_shutoff"
    FAULT = "fault"
    LOW_BATTERY = "low_battery"
    NO_CONTACT = "no_contact"


class FaultCode(StrEnum):
    OVERCURRENT = "overcurrent"
    DC_OFFSET = "dc_offset"
    SHORT_CIRCUIT = "short_circuit"
    OVERTEMP_ELECTRODE = "overtemp_electrode"
    OVERTEMP_BATTERY = "overtemp_battery"
    BROWNOUT = "brownout"
    OUTPUT_WHILE_CHARGING = "output_while_charging"
    WATCHDOG = "watchdog"


class RebootReason(StrEnum):
    POWER_ON = "power_on"
    WATCHDOG = "watchdog"
    BROWNOUT = "brownout"
    FIRMWARE_UPDATE = "firmware_update"
    PANIC = "panic"


class ReportKind(StrEnum):
    REDNESS = "redness"
    BURN = "burn"
    DISCOMFORT = "discomfort"
    OTHER = "other"


class ConfigStatus(StrEnum):
    APPLIED = "applied"
    REJECTED = "rejected"


class RejectionReason(StrEnum):
    BAD_SIGNATURE = "bad_signature"
    STALE_VERSION = "stale_version"
    OUTSIDE_ENVELOPE = "outside_envelope"
    EXPIRED = "expired"
    MALFORMED = "malformed"

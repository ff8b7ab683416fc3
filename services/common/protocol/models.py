"""Protocol v1 payloads as strict pydantic models, one per channel, and their plausible ranges.

Strict: ``true`` is not an int and ``"5"`` is not a number; an int is accepted where a number
is expected. Unknown fields are ignored, since v1 grows only by adding optional fields.
"""

from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from services.common.protocol.enums import (
    ConfigStatus,
    EndReason,
    FaultCode,
    Mode,
    RebootReason,
    RejectionReason,
    ReportKind,
    Waveform,
)
from services.common.protocol.limits import INT32_MAX, REAL_MAX, SESSION_ID_MAX

PROTOCOL_VERSION: Final = 1
MAX_SAMPLES: Final = 1000

# Plausible ranges: outside them a reading is a broken sensor or a broken encoder, not a fault
# to alert on. Safety thresholds live in the rules, not here.
INT64_MAX: Final = 2**63 - 1  # seq, ts and version land in PostgreSQL bigint columns
LEVEL_MIN: Final = 0
LEVEL_MAX: Final = 10
BATT_PCT_MIN: Final = 0
BATT_PCT_MAX: Final = 100
CURRENT_UA_MIN: Final = 0.0
CURRENT_UA_MAX: Final = 100_000.0
VOLTAGE_V_MIN: Final = -100.0
VOLTAGE_V_MAX: Final = 100.0
IMPEDANCE_OHM_MIN: Final = 0.0
IMPEDANCE_OHM_MAX: Final = REAL_MAX  # stored as real: a larger reading would be +Infinity
TEMP_C_MIN: Final = -40.0
TEMP_C_MAX: Final = 150.0


def _only_v1(value: int) -> int:
    if value != PROTOCOL_VERSION:
        raise ValueError(f"unsupported protocol version {value}, expected {PROTOCOL_VERSION}")
    return value


Version = Annotated[int, AfterValidator(_only_v1)]
Seq = Annotated[int, Field(ge=0, le=INT64_MAX)]
EpochMs = Annotated[int, Field(ge=0, le=INT64_MAX)]
SessionId = Annotated[str, Field(max_length=SESSION_ID_MAX)]
Level = Annotated[int, Field(ge=LEVEL_MIN, le=LEVEL_MAX)]
Current = Annotated[float, Field(ge=CURRENT_UA_MIN, le=CURRENT_UA_MAX)]
Temperature = Annotated[float, Field(ge=TEMP_C_MIN, le=TEMP_C_MAX)]
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]
# Mode-table versions are PostgreSQL integer columns (the backend issues them, config_pushes).
TableVersion = Annotated[int, Field(ge=1, le=INT32_MAX)]


class _Wire(BaseModel):
    # hide_input_in_errors: payloads can carry user ids; errors are logged and dead-lettered.
    model_config = ConfigDict(
        strict=True, extra="ignore", frozen=True, allow_inf_nan=False, hide_input_in_errors=True
    )


class Sample(_Wire):
    """One reading; every field but ``ts`` may be absent or null."""

    ts: EpochMs
    mode: Mode | None = None
    level: Level | None = None
    out: bool | None = None
    i_ua: Current | None = None
    i_set_ua: Current | None = None
    v_v: Annotated[float, Field(ge=VOLTAGE_V_MIN, le=VOLTAGE_V_MAX)] | None = None
    z_ohm: Annotated[float, Field(ge=IMPEDANCE_OHM_MIN, le=IMPEDANCE_OHM_MAX)] | None = None
    t_elec_c: Temperature | None = None
    t_batt_c: Temperature | None = None
    batt_pct: Annotated[int, Field(ge=BATT_PCT_MIN, le=BATT_PCT_MAX)] | None = None
    charging: bool | None = None


class Telemetry(_Wire):
    """A batch of samples: ten a second while output runs, one a minute while idle."""

    v: Version
    seq: Seq
    session: SessionId | None = None
    samples: Annotated[list[Sample], Field(min_length=1, max_length=MAX_SAMPLES)]


class _Stamped(_Wire):
    """The common fields of a device message that counts: version, sequence, event time."""

    v: Version
    seq: Seq
    ts: EpochMs


class SessionStart(_Stamped):
    type: Literal["session_start"]
    session: SessionId
    mode: Mode
    level: Level
    user: str | None = None


class SessionEnd(_Stamped):
    type: Literal["session_end"]
    session: SessionId
    duration_s: Count
    reason: EndReason


class Fault(_Stamped):
    type: Literal["fault"]
    code: FaultCode
    detail: dict[str, Any] | None = None


class Reboot(_Stamped):
    type: Literal["reboot"]
    reason: RebootReason


class UserReport(_Stamped):
    type: Literal["user_report"]
    kind: ReportKind
    note: str | None = None


class Charging(_Stamped):
    type: Literal["charging"]
    on: bool


Event = Annotated[
    SessionStart | SessionEnd | Fault | Reboot | UserReport | Charging,
    Field(discriminator="type"),
]


class ConfigReport(_Wire):
    """The device's answer to a mode table: which version it runs, or why it refused one."""

    version: TableVersion
    sha256: str
    status: ConfigStatus
    reason: RejectionReason | None = Field(default=None, validate_default=True)

    @field_validator("reason")
    @classmethod
    def _rejection_names_reason(
        cls, reason: RejectionReason | None, info: ValidationInfo
    ) -> RejectionReason | None:
        if reason is None and info.data.get("status") is ConfigStatus.REJECTED:
            raise ValueError("a rejected table must name its reason")
        return reason


class OutboxDrops(_Wire):
    """What a device's outbox has dropped since it was set up (optional, added in v1)."""

    messages: Count
    telemetry: Count
    events: Count
    state: Count
    first_seq: Seq | None = None
    last_seq: Seq | None = None


class State(_Stamped):
    """Retained: the firmware a device runs and what it did with the last mode table."""

    fw: str
    hw: str
    config: ConfigReport | None = None
    dropped: OutboxDrops | None = None


class Presence(_Wire):
    """``ts`` is absent in the last will, which the broker publishes long after it was set."""

    v: Version
    online: bool
    ts: EpochMs | None = None


class ModeSpec(_Wire):
    """One mode's limits. Integers only, so every signer produces the same canonical JSON."""

    waveform: Waveform
    i_target_ua: Count
    i_max_ua: Count
    freq_hz: Count
    pulse_ms: Count
    v_max_v: Count
    z_ok_ohm: tuple[Count, Count]
    session_default_s: Count
    session_cap_s: Count
    cooldown_s: Count
    max_sessions_24h: Count
    max_sessions_7d: Count
    min_batt_pct: Annotated[int, Field(ge=BATT_PCT_MIN, le=BATT_PCT_MAX)]
    t_elec_max_c: Annotated[int, Field(ge=TEMP_C_MIN, le=TEMP_C_MAX)]

    @field_validator("z_ok_ohm")
    @classmethod
    def _range_is_ordered(cls, bounds: tuple[int, int]) -> tuple[int, int]:
        if bounds[0] > bounds[1]:
            raise ValueError("z_ok_ohm must be [low, high] with low <= high")
        return bounds


class ConfigTable(_Wire):
    """The signed mode table (shape only; the signature is checked by whoever holds the key)."""

    v: Version
    version: TableVersion
    issued_at: EpochMs
    expires_at: EpochMs | None = None
    reason: str | None = None
    locked_modes: list[Mode] = Field(default_factory=list)
    modes: dict[Mode, ModeSpec]
    sig: Annotated[str, Field(min_length=1)]


Message = (
    Telemetry
    | SessionStart
    | SessionEnd
    | Fault
    | Reboot
    | UserReport
    | Charging
    | State
    | Presence
    | ConfigTable
)

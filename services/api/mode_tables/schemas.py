"""Mode table schemas: the shape devices accept (protocol.md, ``config``), checked before the
envelope (safety.md), which the service checks next."""

import uuid
from datetime import datetime
from typing import Annotated, Any, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, model_validator

from services.api.schemas import body_config
from services.common.mode_tables import DEFAULT_MODES, ENVELOPE
from services.common.protocol.enums import Mode, Waveform


def _whole(value: object) -> object:
    """A JSON number with no fraction (``6.0``) is the integer JSON schema says it is; ``6.5``,
    strings and booleans stay what they are, for the integer check to refuse."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Device firmware holds integers on the wire; a bound keeps absurd values out of the database.
Count = Annotated[StrictInt, Field(ge=0, le=2_147_483_647), BeforeValidator(_whole)]


def _within_envelope(schema: dict[str, Any]) -> None:
    """Each field's safety-envelope limit (safety.md) as its ``minimum``/``maximum``: a table
    the schema allows is inside the envelope field by field. What JSON schema cannot say is
    stated in the description and still refused: ``i_target_ua`` above ``i_max_ua``,
    ``z_ok_ohm`` low above high, ``session_default_s`` above ``session_cap_s``."""
    properties = schema["properties"]
    for name, low, high in ENVELOPE:
        field = properties[name]
        if low is not None:
            field["minimum"] = max(field.get("minimum", low), low)
        if high is not None:
            field["maximum"] = min(field.get("maximum", high), high)


class ModeSpec(BaseModel):
    """One mode's output and usage limits, as devices receive them. Refused beyond the
    schema: ``i_target_ua`` above ``i_max_ua``, ``z_ok_ohm`` low above high,
    ``session_default_s`` above ``session_cap_s``."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra=lambda schema, _: _within_envelope(schema)
    )

    waveform: Waveform
    i_target_ua: Count = Field(description="current setpoint, µA")
    i_max_ua: Count = Field(description="hard current limit, µA")
    freq_hz: Count
    pulse_ms: Count
    v_max_v: Count = Field(description="electrode voltage limit, V")
    z_ok_ohm: tuple[Count, Count] = Field(description="[low, high]: the gel band of impedance")
    session_default_s: Count
    session_cap_s: Count
    cooldown_s: Count
    max_sessions_24h: Count
    max_sessions_7d: Count
    min_batt_pct: Annotated[StrictInt, Field(ge=0, le=100), BeforeValidator(_whole)]
    t_elec_max_c: Annotated[StrictInt, Field(ge=-40, le=150), BeforeValidator(_whole)]

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        low, high = self.z_ok_ohm
        if low > high:
            raise ValueError("z_ok_ohm: low must not be above high")
        if self.session_default_s > self.session_cap_s:
            raise ValueError("session_default_s must not be above session_cap_s")
        return self


class ModeTableCreate(BaseModel):
    """A named table of mode specs; modes not listed are unavailable on the device."""

    model_config = body_config(
        {
            "name": "gentler LIFT",
            "modes": {"LIFT": {**DEFAULT_MODES["LIFT"], "i_target_ua": 250}},
            "locked_modes": [],
        }
    )

    name: str = Field(min_length=1, max_length=100)
    modes: dict[Mode, ModeSpec] = Field(min_length=1)
    locked_modes: list[Mode] = Field(
        default_factory=list, max_length=len(Mode), json_schema_extra={"uniqueItems": True}
    )
    brand: str | None = Field(
        default=None, description="operator keys only: the brand the table belongs to"
    )

    @model_validator(mode="after")
    def _distinct_locks(self) -> Self:
        if len(set(self.locked_modes)) != len(self.locked_modes):
            raise ValueError("locked_modes: list each mode once")
        return self


class ModeTable(BaseModel):
    """A stored table. Tables are immutable: a change is a new table."""

    id: uuid.UUID
    brand: str
    name: str
    modes: dict[Mode, ModeSpec]
    locked_modes: list[Mode]
    created_at: datetime
    created_by: str


class ModeTableList(BaseModel):
    items: list[ModeTable]
    next_cursor: str | None


class EnvelopeLimit(BaseModel):
    """One field's limits in the safety envelope (``null``: no limit that way)."""

    field: str
    min: int | None
    max: int | None


class Envelope(BaseModel):
    """What a new table may hold: the envelope's limits per field and the default tables."""

    limits: list[EnvelopeLimit]
    defaults: dict[Mode, ModeSpec]

"""Device time and the durations alerts say out loud."""

from datetime import UTC, datetime


def from_ms(epoch_ms: int) -> datetime:
    """A device's epoch milliseconds as an aware UTC datetime."""
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)


def seconds_text(seconds: float) -> str:
    """``41 s``, ``2.5 s``, ``3 min 5 s``: how a support agent would say a short duration."""
    if seconds < 60:
        return f"{seconds:.1f} s".replace(".0 s", " s")
    whole = round(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes} min {rest} s" if rest else f"{minutes} min"


def minutes_text(seconds: float) -> str:
    """``20-minute``-style durations for limits: ``20 minutes``, ``4 hours``, ``90 s``."""
    if seconds < 60:
        return f"{round(seconds)} s"
    if seconds < 2 * 3600:
        minutes = round(seconds / 60)
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    hours = seconds / 3600
    return f"{hours:g} hours" if hours == int(hours) else f"{hours:.1f} hours"


def limit_text(seconds: float) -> str:
    """A limit as an adjective: ``20-minute``, ``90-second``."""
    whole = round(seconds)
    if whole % 60 == 0:
        return f"{whole // 60}-minute"
    return f"{whole}-second"

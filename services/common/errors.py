"""The base of every Galvani error, so a boundary can translate them in one place."""


class GalvaniError(Exception):
    """Base class for errors raised by Galvani code (never a raw library error)."""


class DatabaseUnavailable(GalvaniError):
    """PostgreSQL could not be reached or refused the connection."""

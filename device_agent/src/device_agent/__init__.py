"""Galvani device agent: speaks protocol v1 over MQTT on the device's application processor."""

__version__ = "0.1.0"

"""Rules: the safety catalogue evaluated on the device stream, alerts and SAFE mode tables."""

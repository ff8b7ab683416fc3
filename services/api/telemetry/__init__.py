"""A device's telemetry: raw samples or min/avg/max per bucket."""

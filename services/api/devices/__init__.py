"""Devices: provisioning with broker credentials, listing, details, decommissioning."""

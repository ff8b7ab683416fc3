"""Liveness, readiness and metrics endpoints for operations."""

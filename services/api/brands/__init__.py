"""Brands and API keys (the operator and brand admins)."""

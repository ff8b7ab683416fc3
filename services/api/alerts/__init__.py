"""Alerts: list, details with the explanation, acknowledge and resolve."""

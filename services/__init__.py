"""Galvani backend services: api, ingest, rules, and what they share in common."""

"""Deployment tooling: how Galvani's broker, database and services are started."""

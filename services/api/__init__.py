"""The REST API for brands' dashboards, support teams and app backends."""

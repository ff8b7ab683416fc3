"""A device's conflicting messages: what ingest could not store under a key already taken."""

"""The NATS cluster's auth-callout responder: every device and service login on the cluster
is decided here, from the database (devices) and the broker directory's service password file
(services), so the database stays the only credential store and provisioning takes effect at
the next CONNECT."""

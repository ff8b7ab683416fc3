"""Start and stop the local stack: PostgreSQL (+TimescaleDB), Mosquitto and the services."""

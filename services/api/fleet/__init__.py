"""Fleet summary and dead letters."""

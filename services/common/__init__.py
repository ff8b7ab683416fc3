"""What the services share: settings, database, protocol models, errors."""

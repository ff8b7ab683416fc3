"""The support dashboard's page and static files, served by the API."""

"""Configuration: datastore definitions, credentials, the workspace registry."""

"""Configuration: datastore definitions, credentials, the workspace registry,
cache settings, data reference URIs and the run manifest (manifest*.py)."""

"""hiermem: services model_server."""

"""hiermem: services."""

"""hiermem: memory_store."""

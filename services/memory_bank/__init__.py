"""hiermem: services memory_bank."""

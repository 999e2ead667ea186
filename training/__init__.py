"""hiermem: training."""

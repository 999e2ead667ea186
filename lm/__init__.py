"""hiermem: lm."""

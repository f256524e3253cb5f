"""Checkpoint loading and weight layout transforms (installed as ``moe_backend.weights``)."""

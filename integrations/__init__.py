"""Serving-engine adapters (installed as ``moe_backend.integrations``); only these import engines."""

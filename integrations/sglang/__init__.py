"""SGLang adapter (installed as ``moe_backend.integrations.sglang``)."""

"""vLLM adapter (installed as ``moe_backend.integrations.vllm``)."""

"""dllm: D-LLM, token-adaptive layer skipping for Llama-family models."""

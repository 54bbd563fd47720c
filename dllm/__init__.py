"""dllm: D-LLM, token-adaptive layer skipping for Llama-family models."""
from dllm.generation import Llama
from dllm.core.model import ModelArgs, Transformer
from dllm.tokenizer import Tokenizer

__all__ = ["Llama", "ModelArgs", "Tokenizer", "Transformer"]

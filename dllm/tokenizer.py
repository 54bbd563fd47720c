"""SentencePiece tokenizer with Meta's Llama API."""
import os
from typing import List

from sentencepiece import SentencePieceProcessor

from dllm.errors import InputError


class Tokenizer:
    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise InputError(f"tokenizer model not found: {model_path}")
        self.sp_model = SentencePieceProcessor(model_file=model_path)
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        assert type(s) is str
        tokens = self.sp_model.encode(s)
        if bos:
            tokens = [self.bos_id] + tokens
        if eos:
            tokens = tokens + [self.eos_id]
        return tokens

    def decode(self, tokens: List[int]) -> str:
        return self.sp_model.decode(tokens)

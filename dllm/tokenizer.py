"""Tokenizers with Meta's Llama API over a SentencePiece `tokenizer.model` or a Hugging Face `tokenizer.json`."""
import json
import os
from typing import List, Optional

import tokenizers
from sentencepiece import SentencePieceProcessor

from dllm.errors import InputError


class Tokenizer:
    """Meta's tokenizer API (n_words, bos_id, eos_id, pad_id, encode, decode) for either file format.

    `path` is a `tokenizer.model`, a `tokenizer.json`, or a model directory holding one of them
    (`tokenizer.json` first, as transformers prefers it). Beyond Meta's API: `unk_id`, `stop_ids`,
    the ids that end generation, `special_ids`, the ids of special tokens, `chat_template`, the
    model's Jinja chat template or None, `adds_bos` (see below) and `token_text(id)`, one token as
    the vocabulary spells it. Ids a model has no token for are -1.

    `encode(s, bos=True, ...)` puts bos in front only where the model's own convention does
    (SentencePiece: always; tokenizer.json: `add_bos_token` in tokenizer_config.json, else the
    post-processor's template), so that a prompt starts the way it did when the model was trained and
    evaluated with its own tokenizer (SmolLM2's adds none): `encode(s, True, False)` equals
    transformers' `tok(s)["input_ids"]` and `encode(s, False, False)` equals
    `tok(s, add_special_tokens=False)["input_ids"]`. Special tokens written in the text of a
    tokenizer.json model are encoded as their ids, as transformers does.
    """

    def __init__(self, path: str):
        file = find_tokenizer_file(path)
        backend = HuggingFaceBackend(file) if file.endswith(".json") else SentencePieceBackend(file)
        self._backend = backend
        self.n_words: int = backend.n_words
        self.bos_id: int = backend.bos_id
        self.eos_id: int = backend.eos_id
        self.pad_id: int = backend.pad_id
        self.unk_id: int = backend.unk_id
        self.stop_ids: frozenset = backend.stop_ids
        self.special_ids: frozenset = backend.special_ids
        self.chat_template: Optional[str] = backend.chat_template
        self.adds_bos: bool = backend.adds_bos

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        assert type(s) is str
        tokens = self._backend.encode(s)
        # a chat template may write bos itself (Llama-3): a sequence starts with one, never two
        if bos and self.adds_bos and tokens[:1] != [self.bos_id]:
            tokens = [self.bos_id] + tokens
        if eos:
            tokens = tokens + [self.eos_id]
        return tokens

    def decode(self, tokens: List[int]) -> str:
        """The text of the tokens, special tokens included (tokenizer.json) or as SentencePiece drops them."""
        return self._backend.decode(tokens)

    def token_text(self, token: int) -> str:
        return self._backend.token_text(token)


def find_tokenizer_file(path: str) -> str:
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise InputError(f"tokenizer not found: {path}")
    for name in ("tokenizer.json", "tokenizer.model"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise InputError(f"{path}: no tokenizer.json or tokenizer.model in this directory")


class SentencePieceBackend:
    """Meta's Llama tokenizer: bos before every encoded text, generation stops at eos."""

    def __init__(self, file: str):
        try:
            self.model = SentencePieceProcessor(model_file=file)
        except (RuntimeError, OSError) as e:
            raise InputError(f"{file}: not a SentencePiece model ({first_line(e)})") from None
        self.n_words = self.model.vocab_size()
        self.bos_id = self.model.bos_id()
        self.eos_id = self.model.eos_id()
        self.pad_id = self.model.pad_id()
        self.unk_id = self.model.unk_id()
        self.stop_ids = frozenset({self.eos_id})
        self.special_ids = frozenset(i for i in range(self.n_words) if self.model.is_control(i))
        self.chat_template = None
        self.adds_bos = True

    def encode(self, s: str) -> List[int]:
        return self.model.encode(s)

    def decode(self, tokens: List[int]) -> str:
        return self.model.decode(tokens)

    def token_text(self, token: int) -> str:
        return self.model.id_to_piece(token)


class HuggingFaceBackend:
    """tokenizer.json, with the special tokens, bos convention and chat template of the files beside it."""

    def __init__(self, file: str):
        try:
            self.model = tokenizers.Tokenizer.from_file(file)
        except Exception as e:  # the tokenizers library raises a bare Exception for any file it cannot read
            raise InputError(f"{file}: not a readable tokenizer.json ({first_line(e)})") from None
        directory = os.path.dirname(file)
        config = read_json(os.path.join(directory, "tokenizer_config.json"))
        # generation_config.json is what transformers' generate() follows, so its ids come first
        model_configs = [read_json(os.path.join(directory, name))
                         for name in ("generation_config.json", "config.json")]
        self.n_words = max(self.model.get_vocab(with_added_tokens=True).values()) + 1
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (
            self._special_id(name, config, model_configs) for name in ("bos", "eos", "pad", "unk"))
        config_eos_ids = {i for c in model_configs for i in as_ids(c.get("eos_token_id"))}
        self.stop_ids = frozenset({self.eos_id} | config_eos_ids) - {-1}
        self.special_ids = frozenset(i for i, token in self.model.get_added_tokens_decoder().items() if token.special)
        self.chat_template = read_chat_template(directory, config)
        adds_bos = config.get("add_bos_token")
        if adds_bos is None:
            adds_bos = self.model.encode("", add_special_tokens=True).ids[:1] == [self.bos_id]
        self.adds_bos = bool(adds_bos) and self.bos_id >= 0

    def _special_id(self, name: str, config: dict, model_configs: List[dict]) -> int:
        """From tokenizer_config.json's `<name>_token` (a string or {"content": ...}), else the model configs' id."""
        token = config.get(f"{name}_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and self.model.token_to_id(token) is not None:
            return self.model.token_to_id(token)
        for model_config in model_configs:
            ids = as_ids(model_config.get(f"{name}_token_id"))
            if ids:
                return ids[0]
        return -1

    def encode(self, s: str) -> List[int]:
        return self.model.encode(s, add_special_tokens=False).ids

    def decode(self, tokens: List[int]) -> str:
        return self.model.decode(tokens, skip_special_tokens=False)

    def token_text(self, token: int) -> str:
        return self.model.id_to_token(token)


def read_chat_template(directory: str, config: dict) -> Optional[str]:
    """chat_template.jinja (the current layout), else tokenizer_config.json's `chat_template`: a string,
    or a list of {"name", "template"} of which transformers uses "default"."""
    file = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def read_json(file: str) -> dict:
    """A JSON object from a file, {} when the file does not exist."""
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{file}: not readable JSON ({first_line(e)})") from None
    if not isinstance(value, dict):
        raise InputError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def as_ids(value) -> List[int]:
    """A config's token id field, which is an int, a list of ints or null."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

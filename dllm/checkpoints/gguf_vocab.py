"""Hugging Face tokenizer files from the tokenizer a GGUF file describes in its metadata.

A GGUF carries no tokenizer.json, only llama.cpp's keys (tokens, token types, merges or scores,
special token ids, chat template). `write_tokenizer_files` builds from them, with the `tokenizers`
library, the tokenizer transformers builds for the same file
(transformers/integrations/gguf/gguf_tokenizer_mapping.py, version 5.24), so the ids are the same as
`AutoTokenizer.from_pretrained(directory, gguf_file=name)`. The pre-tokenizer rules come from that
module: its split regex per `tokenizer.ggml.pre`, else GPT-2's byte-level regex (which is what
"smollm" gets there, although llama.cpp also splits digits one by one for it).
"""
import json
import os
from typing import Dict, List, Optional, Tuple

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from dllm.errors import InputError
from dllm.checkpoints.gguf_layout import field

# llama.cpp's token types
CONTROL, USER_DEFINED = 3, 4
SPECIAL_TOKEN_KEYS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                      "unk_token": "tokenizer.ggml.unknown_token_id", "pad_token": "tokenizer.ggml.padding_token_id"}

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"], _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}


def write_tokenizer_files(reader: gguf.GGUFReader, out_dir: str):
    """tokenizer.json, tokenizer_config.json and (when the file has one) chat_template.jinja in out_dir."""
    model_type = field(reader, "tokenizer.ggml.model")
    if model_type not in ("gpt2", "llama"):
        raise InputError(f"GGUF tokenizer model {model_type!r} is not supported (supported: 'gpt2', 'llama')")
    tokens: List[str] = field(reader, "tokenizer.ggml.tokens")
    token_types: List[int] = field(reader, "tokenizer.ggml.token_type", [])
    merges = [tuple(merge.split(" ")) for merge in field(reader, "tokenizer.ggml.merges", [])]
    if model_type == "gpt2":
        tokenizer = byte_level_bpe(tokens, merges, field(reader, "tokenizer.ggml.pre"))
        spelled = set(bytes_to_unicode().values())
    else:
        merges = merges or merges_from_scores(tokens, field(reader, "tokenizer.ggml.scores"))
        tokenizer = sentencepiece_bpe(tokens, merges)
        spelled = None

    named = {name: tokens[i] for name, key in SPECIAL_TOKEN_KEYS.items() if (i := field(reader, key)) is not None}
    # a control token outside the byte alphabet is a llama.cpp mislabel in a byte-level vocabulary
    control = [t for t, token_type in zip(tokens, token_types)
               if token_type == CONTROL and (spelled is None or set(t) <= spelled)]
    specials = control + list(named.values())
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    vocab = tokenizer.get_vocab()
    user_defined = [t for t, token_type in zip(tokens, token_types) if token_type == USER_DEFINED and t in vocab]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])

    # llama.cpp puts bos before a SentencePiece vocabulary's text unless the file says otherwise
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", model_type == "llama")) and "bos_token" in named
    add_eos = bool(field(reader, "tokenizer.ggml.add_eos_token", False)) and "eos_token" in named
    tokenizer.post_processor = template_processing(tokenizer, named.get("bos_token") if add_bos else None,
                                                   named.get("eos_token") if add_eos else None)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))

    config = {**named, "add_bos_token": add_bos, "add_eos_token": add_eos}
    context_length = field(reader, f"{field(reader, 'general.architecture')}.context_length")
    if context_length is not None:
        config["model_max_length"] = context_length
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    chat_template = field(reader, "tokenizer.chat_template")
    if chat_template is not None:
        with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(chat_template)


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's spelling of each byte as a printable character, the alphabet of byte-level vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def byte_level_bpe(tokens: List[str], merges: List[Tuple[str, str]], pre: Optional[str]) -> Tokenizer:
    """GPT-2 style: tokens spelled in the byte alphabet (one that is not is respelled), BPE over bytes."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="",
                                     fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def sentencepiece_bpe(tokens: List[str], merges: List[Tuple[str, str]]) -> Tokenizer:
    """Llama's SentencePiece BPE: "▁" for spaces, one in front of the text, unknown characters as <0xNN> bytes."""
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1),
    ])
    return tokenizer


def merges_from_scores(tokens: List[str], scores: List[float]) -> List[Tuple[str, str]]:
    """A SentencePiece file has scores, not merges: each split of a token into two vocabulary tokens is
    a merge, best token score first (transformers' `generate_merges`, so the order is the same)."""
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for token, score in dict(zip(tokens, scores)).items():
        pairs = [(token[:k], token[k:], score) for k in range(1, len(token)) if token[:k] in ids and token[k:] in ids]
        ranked += sorted(pairs, key=lambda pair: (ids[pair[0]], ids[pair[1]]))
    ranked.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]


def template_processing(tokenizer: Tokenizer, bos: Optional[str], eos: Optional[str]) -> processors.TemplateProcessing:
    """What encoding with special tokens adds around a text, as transformers' `update_post_processor`."""
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = " ".join([single] + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else []))
    special = [(t, tokenizer.token_to_id(t)) for t in dict.fromkeys(t for t in (bos, eos) if t)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

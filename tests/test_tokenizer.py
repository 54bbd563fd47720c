"""Tokenizer (SentencePiece and tokenizer.json), GGUF tokenizer files, and chat formats, against transformers."""
import json
import os
import random
import shutil

import gguf
import pytest
import sentencepiece as spm

from dllm.chat import ChatFormat
from dllm.errors import InputError
from dllm.checkpoints.gguf_vocab import PRE_TOKENIZER_SPLITS, merges_from_scores, write_tokenizer_files
from dllm.tokenizer import Tokenizer


FRAGMENTS = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "I'm sure they'll say it's fine, don't you?",
    "naïve café, résumé, Ångström, Œuvre, façade", "e\u0301 combining accent", "日本語のテキストとカタカナ。",
    "中文分词测试：你好，世界！", "한국어 문장입니다.", "Привет, мир! Ελληνικά", "مرحبا بالعالم", "नमस्ते दुनिया",
    "emoji 🤗🚀👍🏽 and a family 👨\u200d👩\u200d👧", "3.14159 2718281828 -42 +7 1e-9 0x1F 1,000,000",
    "123456789012345678901234567890", "version 1.2.3 on 2024-05-09 at 13:34:43", "x   123 4567\t89",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { a[i] = b[i] >> 1; }",
    '<div class="a">&amp; &lt;</div>', '{"key": [1, 2, null], "nested": {"a": true}}',
    "tabs\tand\ttabs\t\t", "  leading and trailing  ", "\n\n\nnewlines\r\nand CRLF\r\n", "multiple     spaces",
    "ALL CAPS SHOUTING", "MiXeD cAsE wOrDs", "<|im_start|>user\nHi<|im_end|>\n", "<|endoftext|>text after",
    "<|im_start|> half <|im_end tag|>", "<jupyter_code>print(1)<empty_output>", "\u00a0no-break\u2009thin\u200bzero",
    "<think>reasoning</think>", "a" * 40, "ab" * 25, "!!!???...,,,;;;", "\\n is not a newline", "", " ", "\t", "\n",
]
SEPARATORS = ["", " ", "  ", "\n", "\n\n", "\t", " \n "]


@pytest.fixture(scope="module")
def texts():
    """Every fragment alone and a few hundred seeded joins of two or three with varied whitespace between."""
    rng = random.Random(0)
    joined = [rng.choice(SEPARATORS).join(rng.sample(FRAGMENTS, rng.randint(2, 3))) for _ in range(300)]
    return FRAGMENTS + joined


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    """transformers' tokenizer for the GGUF, built from the same metadata by its own converter."""
    import transformers

    directory, name = os.path.split(smollm2_gguf)
    return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer_dir):
    return Tokenizer(smollm2_tokenizer_dir)


def assert_same_ids(ours: Tokenizer, reference, texts):
    """With special tokens as transformers adds them (bos only by the model's convention), and without."""
    assert reference(texts)["input_ids"] == [ours.encode(t, bos=True, eos=False) for t in texts]
    assert reference(texts, add_special_tokens=False)["input_ids"] == [ours.encode(t, bos=False, eos=False) for t in texts]


@pytest.mark.slow
def test_ids_equal_transformers_gguf_tokenizer(smollm2, reference, texts):
    assert_same_ids(smollm2, reference, texts)


@pytest.mark.slow
def test_pre_tokenizer_rules_are_transformers_table():
    """The split regex per `tokenizer.ggml.pre` is transformers' (its other entries have no test file here)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    assert PRE_TOKENIZER_SPLITS == GGUF_PRE_TOKENIZER_SPLITS


@pytest.mark.slow
def test_decode_inverts_encode(smollm2, texts):
    assert [smollm2.decode(smollm2.encode(t, bos=False, eos=False)) for t in texts] == texts


@pytest.mark.slow
def test_special_ids_and_sizes_follow_the_gguf(smollm2, reference):
    assert smollm2.n_words == len(reference)
    named = (reference.bos_token, reference.eos_token, reference.pad_token)
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.pad_id) == tuple(reference.convert_tokens_to_ids(named))
    assert smollm2.encode("Hi", bos=False, eos=True)[-1] == smollm2.eos_id


DIALOGS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}],
    [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3 + 3? 🤔\n  Show <|im_end|> work."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A"},
     {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"},
     {"role": "assistant", "content": "D"}, {"role": "user", "content": "日本語"}],
]


@pytest.mark.slow
@pytest.mark.parametrize("dialog", DIALOGS)
def test_chat_template_ids_equal_transformers(smollm2, reference, dialog):
    expected = reference.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ChatFormat(smollm2).encode_dialog(dialog) == expected


@pytest.mark.slow
def test_stop_ids_contain_end_of_turn_token(smollm2):
    assert smollm2.encode("<|im_end|>", bos=False, eos=False)[0] in ChatFormat(smollm2).stop_ids


def copy_tokenizer_json(smollm2_tokenizer_dir, tmp_path, tokenizer_config: dict, **files) -> Tokenizer:
    """A HF-layout directory: SmolLM2's tokenizer.json, the given tokenizer_config.json and other JSON files."""
    tmp_path.mkdir(exist_ok=True)
    shutil.copy(os.path.join(smollm2_tokenizer_dir, "tokenizer.json"), tmp_path)
    for name, content in {"tokenizer_config": tokenizer_config, **files}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    return Tokenizer(str(tmp_path))


# ChatML with indented blocks and a tojson call: blocks are trimmed and HTML is not escaped, as in transformers
MULTILINE_TEMPLATE = """{%- for message in messages %}
    {%- if loop.first and message['role'] != 'system' %}
<|im_start|>system
{{ "Quote <b>&</b>:" | tojson }}<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] | trim }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["string", "named list"])
def test_chat_template_inside_tokenizer_config(smollm2_tokenizer_dir, tmp_path, layout):
    """The older layout: the template in tokenizer_config.json, alone or as the "default" of named templates."""
    import transformers

    template = MULTILINE_TEMPLATE if layout == "string" else [
        {"name": "tool_use", "template": "unused"}, {"name": "default", "template": MULTILINE_TEMPLATE}]
    tokenizer = copy_tokenizer_json(smollm2_tokenizer_dir, tmp_path, {"chat_template": template})
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tokenizer.chat_template == MULTILINE_TEMPLATE
    for dialog in DIALOGS:
        expected = reference.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)["input_ids"]
        assert ChatFormat(tokenizer).encode_dialog(dialog) == expected


@pytest.mark.slow
def test_end_of_turn_token_found_from_the_template_not_eos(smollm2_tokenizer_dir, smollm2, tmp_path):
    """eos here is <|endoftext|>; <|im_end|> still ends a turn because the template writes it after a reply."""
    template = open(os.path.join(smollm2_tokenizer_dir, "chat_template.jinja")).read()
    config = {"eos_token": "<|endoftext|>", "chat_template": template}
    tokenizer = copy_tokenizer_json(smollm2_tokenizer_dir, tmp_path, config)
    end_of_text, end_of_turn = (smollm2.encode(t, bos=False, eos=False)[0] for t in ("<|endoftext|>", "<|im_end|>"))
    assert tokenizer.stop_ids == {end_of_text}
    assert ChatFormat(tokenizer).stop_ids == {end_of_text, end_of_turn}


@pytest.mark.slow
def test_ids_from_model_configs_when_tokenizer_config_has_none(smollm2_tokenizer_dir, tmp_path):
    """Without tokens in tokenizer_config.json: generation_config.json first, then config.json; every id of an
    eos_token_id list stops generation."""
    tokenizer = copy_tokenizer_json(
        smollm2_tokenizer_dir, tmp_path, {}, generation_config={"eos_token_id": [5, 7]},
        config={"bos_token_id": 3, "eos_token_id": 9, "pad_token_id": None})
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (3, 5, -1)
    assert tokenizer.stop_ids == {5, 7, 9}
    assert tokenizer.chat_template is None


@pytest.mark.slow
def test_bos_from_post_processor_when_config_is_silent(smollm2_tokenizer_dir, tmp_path):
    """A tokenizer.json whose post-processor writes bos (Llama-3's layout): encode(bos=True) puts it first."""
    data = json.load(open(os.path.join(smollm2_tokenizer_dir, "tokenizer.json")))
    bos = "<|im_start|>"
    data["post_processor"] = {
        "type": "TemplateProcessing", "pair": [],
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "special_tokens": {bos: {"id": bos, "ids": [data["model"]["vocab"][bos]], "tokens": [bos]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos}))
    tokenizer = Tokenizer(str(tmp_path / "tokenizer.json"))
    assert tokenizer.encode("Hi", bos=True, eos=False) == [tokenizer.bos_id] + tokenizer.encode("Hi", bos=False, eos=False)


@pytest.fixture(scope="module")
def llama_gguf(tokenizer_path, tmp_path_factory) -> str:
    """A GGUF holding only the SentencePiece test tokenizer as llama.cpp stores one (tokens, scores, types),
    plus a user-defined token, which is matched whole in text but is not special."""
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    n = sp.vocab_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    path = str(tmp_path_factory.mktemp("llama-gguf") / "tokenizer.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)] + ["<think>"])
    writer.add_token_scores([sp.get_score(i) for i in range(n)] + [0.0])
    writer.add_token_types(types + [4])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.slow
def test_llama_gguf_tokenizer_equals_transformers(llama_gguf, tmp_path, texts):
    """SentencePiece-style BPE with byte fallback, merges derived from the scores (in the same order), bos first."""
    import transformers

    write_tokenizer_files(gguf.GGUFReader(llama_gguf), str(tmp_path))
    ours = Tokenizer(str(tmp_path))
    directory, name = os.path.split(llama_gguf)
    reference = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    written = json.loads((tmp_path / "tokenizer.json").read_text())
    assert written["model"] == json.loads(reference.backend_tokenizer.to_str())["model"]
    assert_same_ids(ours, reference, texts)
    ids = [ours.encode(t, bos=False, eos=False) for t in texts]
    assert [ours.decode(i) for i in ids] == [reference.decode(i) for i in ids]


@pytest.mark.slow
def test_merges_from_scores_rank_like_transformers():
    """Ties in token score: longer left piece first, then transformers' order."""
    from transformers.tokenization_utils_base import generate_merges

    tokens = ["a", "b", "c", "ab", "bc", "ca", "abc", "cab", "bca"]
    scores = [0.0, 0.0, 0.0, -1.0, -1.0, -1.0, -2.0, -2.0, -3.0]
    expected = generate_merges({t: i for i, t in enumerate(tokens)}, dict(zip(tokens, scores)))
    assert merges_from_scores(tokens, scores) == expected


def test_unsupported_gguf_tokenizer_model(tmp_path):
    path = str(tmp_path / "bert.gguf")
    writer = gguf.GGUFWriter(path, "bert")
    writer.add_tokenizer_model("bert")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InputError, match="'bert' is not supported"):
        write_tokenizer_files(gguf.GGUFReader(path), str(tmp_path / "out"))


def test_sentencepiece_keeps_meta_conventions(tokenizer_path, tmp_path):
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
    tokenizer = Tokenizer(str(tmp_path))  # a Meta checkpoint directory
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    text = "The quick brown fox"
    assert tokenizer.encode(text, bos=True, eos=True) == [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
    assert (tokenizer.n_words, tokenizer.pad_id, tokenizer.stop_ids, tokenizer.chat_template) == (
        sp.vocab_size(), sp.pad_id(), {sp.eos_id()}, None)


def test_llama2_format_without_template(tokenizer_path):
    tokenizer = Tokenizer(tokenizer_path)
    chat = ChatFormat(tokenizer)
    system_first = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "The quick fox"}]
    expected = "[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nThe quick fox [/INST]"
    assert chat.encode_dialog(system_first) == tokenizer.encode(expected, bos=True, eos=False)
    turns = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}]
    assert chat.encode_dialog(turns) == (tokenizer.encode("[INST] A [/INST] B ", bos=True, eos=True)
                                         + tokenizer.encode("[INST] C [/INST]", bos=True, eos=False))
    assert chat.stop_ids == {tokenizer.eos_id}
    with pytest.raises(InputError, match="last message of a dialog must be from the user"):
        chat.encode_dialog(turns[:2])
    with pytest.raises(InputError, match="alternates user and assistant"):
        chat.encode_dialog([turns[0], turns[0]])


def test_missing_or_unreadable_tokenizer(tmp_path):
    with pytest.raises(InputError, match="tokenizer not found"):
        Tokenizer(str(tmp_path / "absent"))
    with pytest.raises(InputError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    with pytest.raises(InputError, match="not a readable tokenizer.json") as error:
        Tokenizer(str(tmp_path))
    assert str(tmp_path / "tokenizer.json") in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize("dialog", [
    "Hi", [], [{"role": "user"}], [{"role": "user", "content": ["Hi"]}], [("user", "Hi")],
])
def test_malformed_dialog(smollm2, tokenizer_path, dialog):
    for tokenizer in (smollm2, Tokenizer(tokenizer_path)):
        with pytest.raises(InputError, match="a dialog is a non-empty list"):
            ChatFormat(tokenizer).encode_dialog(dialog)


@pytest.mark.slow
def test_template_raising_is_an_input_error(smollm2_tokenizer_dir, tmp_path):
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system messages') }}"
                "{% endif %}{{ m['content'] }}{% endfor %}")
    chat = ChatFormat(copy_tokenizer_json(smollm2_tokenizer_dir, tmp_path, {"chat_template": template}))
    with pytest.raises(InputError, match="rejects the dialog: no system messages"):
        chat.encode_dialog(DIALOGS[1])

"""Dialogs to prompt tokens: the model's own chat template when it has one, else Llama-2's [INST] format."""
import json
from datetime import datetime
from typing import List

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dllm.errors import InputError
from dllm.tokenizer import Tokenizer, first_line

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
# an assistant message whose end the template marks with its end-of-turn token
PROBE_REPLY = "Dllm probe reply"


class ChatFormat:
    """`encode_dialog(dialog)`: the prompt tokens that ask the model for the next assistant turn.
    `stop_ids`: the tokenizer's stop ids and the template's end-of-turn token, which a chat model
    writes at the end of its answer (SmolLM2's `<|im_end|>`, Llama-3's `<|eot_id|>`)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.template = None if tokenizer.chat_template is None else compile_template(tokenizer.chat_template)
        ids = {name: getattr(tokenizer, f"{name}_id") for name in ("bos", "eos", "unk", "pad")}
        self.special_tokens = {f"{name}_token": tokenizer.token_text(i) for name, i in ids.items() if i >= 0}
        self.stop_ids: frozenset = tokenizer.stop_ids | self._end_of_turn_ids()

    def encode_dialog(self, dialog: List[dict]) -> List[int]:
        check_messages(dialog)
        if self.template is None:
            return self._encode_llama2(dialog)
        # the template writes the special tokens the model expects, bos included
        return self.tokenizer.encode(self.render(dialog, add_generation_prompt=True), bos=False, eos=False)

    def render(self, dialog: List[dict], add_generation_prompt: bool) -> str:
        """The template's text for a dialog, with the variables transformers' apply_chat_template passes."""
        try:
            return self.template.render(messages=dialog, add_generation_prompt=add_generation_prompt,
                                        tools=None, documents=None, **self.special_tokens)
        except jinja2.TemplateError as e:
            raise InputError(f"the chat template rejects the dialog: {first_line(e)}") from None

    def _end_of_turn_ids(self) -> frozenset:
        """The first special token the template writes after an assistant message, found by rendering one."""
        if self.template is None:
            return frozenset()
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE_REPLY}]
        text = self.render(probe, add_generation_prompt=False)
        end = text.find(PROBE_REPLY)
        if end < 0:
            return frozenset()
        after = self.tokenizer.encode(text[end + len(PROBE_REPLY):], bos=False, eos=False)
        return frozenset([i for i in after if i in self.tokenizer.special_ids][:1])

    def _encode_llama2(self, dialog: List[dict]) -> List[int]:
        """Llama-2 chat: [INST] ... [/INST] turns, each exchange between bos and eos, an optional
        system message inside the first."""
        if len(dialog) > 1 and dialog[0]["role"] == "system":
            system, first = dialog[0]["content"], dialog[1]
            dialog = [{"role": first["role"], "content": B_SYS + system + E_SYS + first["content"]}] + dialog[2:]
        if [m["role"] for m in dialog[::2]] != ["user"] * len(dialog[::2]) or any(
            m["role"] != "assistant" for m in dialog[1::2]
        ):
            raise InputError("a dialog alternates user and assistant turns (an optional system message first)")
        if dialog[-1]["role"] != "user":
            raise InputError("the last message of a dialog must be from the user")
        tokens = []
        for prompt, answer in zip(dialog[::2], dialog[1::2]):
            text = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
            tokens += self.tokenizer.encode(text, bos=True, eos=True)
        tokens += self.tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
        return tokens


def check_messages(dialog):
    ok = isinstance(dialog, list) and dialog and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in dialog
    )
    if not ok:
        raise InputError('a dialog is a non-empty list of {"role": str, "content": str} messages')


def compile_template(source: str) -> jinja2.Template:
    """The template in the sandboxed environment transformers renders chat templates in, with its helpers."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise InputError(f"the chat template does not compile: {first_line(e)}") from None


def raise_exception(message: str):
    raise jinja2.TemplateError(message)


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' tojson: no HTML escaping (Jinja's own escapes <, > and &, which would change the prompt)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

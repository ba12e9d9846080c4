"""Chat templates by name: `data.chat_template` is a built-in name, a template file or a Jinja string.

    template = resolve_chat_template("llama-2")     # the Jinja source
    tokenizer.chat_template = template              # rendered through tokenizer.apply_chat_template

The built-ins are the templates the models themselves ship, so a base model fine-tuned with one of
them talks like its chat sibling: `llama-2` is Llama-2-chat's `[INST] ... [/INST]` (with `<<SYS>>`
for a system message), `chatml` is `<|im_start|>role ... <|im_end|>`, `zephyr` is zephyr-7b-beta's
`<|user|>` / `<|assistant|>` turns each closed by the eos token. Each renders a conversation's
earlier turns unchanged when more are added, which is what lets SFT find every assistant turn.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Optional

LLAMA_2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

ZEPHYR = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% elif message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}"
)

BUILTIN_TEMPLATES = {"llama-2": LLAMA_2, "chatml": CHATML, "zephyr": ZEPHYR}


def _is_jinja(text: str) -> bool:
    return "{{" in text or "{%" in text


def chat_template_problem(value: Optional[str], field: str = "data.chat_template") -> Optional[str]:
    """Why `value` names no template (a sentence naming `field` and the fix), or None when it does."""
    if value is None or value in BUILTIN_TEMPLATES or _is_jinja(value):
        return None
    file = Path(value).expanduser()
    if file.is_file():
        return None
    close = difflib.get_close_matches(value, list(BUILTIN_TEMPLATES), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (f"`{field}` is {value!r}, which is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}), "
            f"an existing template file, nor a Jinja string{hint}")


def resolve_chat_template(value: str, field: str = "data.chat_template") -> str:
    """The Jinja source `value` names: a built-in name, a file holding a template, or the template itself.

    Raises:
        ValueError: naming `field`, when `value` is none of these (see `chat_template_problem`).
    """
    problem = chat_template_problem(value, field)
    if problem is not None:
        raise ValueError(problem)
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    if _is_jinja(value):
        return value
    return Path(value).expanduser().read_text(encoding="utf-8")

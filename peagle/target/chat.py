"""The one place where prompts become token ids: the chat template with the generation prompt."""

from __future__ import annotations

import json
import re
from typing import Any

# Chat templates that print the current date (GPT-OSS: "Current date: YYYY-MM-DD"; Llama 3.x:
# "Today Date: DD Mon YYYY") call the template global ``strftime_now``. Rendering with the clock
# would make the same prompt different token ids on different days, so every rendering here pins
# it: each ``strftime_now("<fmt>")`` call in the template is replaced by the pinned day formatted
# with <fmt> (transformers turns callables passed as template variables into strings, so the call
# cannot be overridden). The date is recorded in target.json as ``chat_template_date``. Templates
# without a date (the tiny target's) render the same either way.
DEFAULT_CHAT_DATE = "2025-08-05"

_STRFTIME_CALL = re.compile(r"""strftime_now\(\s*(['"])(.*?)\1\s*\)""")


def pin_template_date(template: str, date: str) -> str:
    """``template`` with every ``strftime_now("<fmt>")`` call replaced by ``date`` (YYYY-MM-DD)
    formatted with <fmt>, as a string literal."""
    import datetime

    try:
        day = datetime.datetime.strptime(date, "%Y-%m-%d")
    except ValueError as e:
        raise ValueError(f"chat template date {date!r} is not YYYY-MM-DD") from e
    return _STRFTIME_CALL.sub(lambda m: json.dumps(day.strftime(m.group(2))), template)


def render_prompt_ids(tokenizer, text: str, *, date: str | None = DEFAULT_CHAT_DATE) -> list[int]:
    """Token ids of one user turn rendered with the chat template and the generation prompt.

    ``date`` (YYYY-MM-DD) is what a date-printing template sees as today; None leaves the clock.
    """
    return render_messages_ids(tokenizer, [{"role": "user", "content": text}], date=date)


def render_messages_ids(tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool = True,
                        date: str | None = DEFAULT_CHAT_DATE) -> list[int]:
    """Token ids of a conversation (``[{"role": "user"|"assistant", "content": str}, ...]``) rendered
    with the chat template, with the generation prompt after it when ``add_generation_prompt``."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default")
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"tokenizer {name!r} has no chat template, so prompts cannot be rendered; "
                         f"use the instruct/chat variant of the target (target.path) or a tokenizer "
                         f"directory whose tokenizer_config.json or chat_template.jinja carries one")
    kw = {} if date is None or "strftime_now" not in template else \
        {"chat_template": pin_template_date(template, date)}
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_dict=False, **kw)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # older/newer return conventions
        ids = ids["input_ids"]
    return [int(i) for i in ids]


# A channel-format answer (GPT-OSS's harmony: analysis, then the final channel): what a chat keeps
# of it in the history is the final channel's text.
_FINAL_CHANNEL = re.compile(r"<\|channel\|>final<\|message\|>(.*?)(?:<\|return\|>|<\|end\|>|<\|call\|>|$)", re.S)


def answer_text(tokenizer, ids: list[int]) -> str:
    """The text of a generated answer as the next turn's history holds it: the final channel of a
    channel-format (harmony) answer, otherwise the answer decoded without special tokens (the
    template adds its own end-of-turn)."""
    final = _FINAL_CHANNEL.search(tokenizer.decode(ids, skip_special_tokens=False))
    return final.group(1) if final else tokenizer.decode(ids, skip_special_tokens=True)


def history_prompt_ids(tokenizer, turns: list[str], answers: list[str], *,
                       date: str | None = DEFAULT_CHAT_DATE) -> tuple[list[int], list[tuple[int, int]]]:
    """The prompt of turn ``len(answers) + 1`` of a conversation and where the earlier answers lie in it.

    ``turns``: the user turns (at least ``len(answers) + 1``); ``answers``: the target's own answers
    to the first ones, as text (:func:`answer_text`). The prompt is the conversation so far
    rendered by the chat template with the generation prompt, as a chat server renders it. Answer
    i's span ``[start, end)`` runs from the end of turn i's own generation prompt to the end of the
    history through answer i (its end-of-turn tokens included); the spans are ``[]`` when the
    template renders the history so that those shorter renderings are not prefixes of the prompt
    (templates that drop an earlier turn's reasoning): then only the last answer is trained on.
    """
    n = len(answers)
    if len(turns) <= n:
        raise ValueError(f"history_prompt_ids: {len(turns)} user turns cannot follow {n} answers")
    messages: list[dict[str, str]] = []
    for i in range(n):
        messages += [{"role": "user", "content": turns[i]}, {"role": "assistant", "content": answers[i]}]
    prompt = render_messages_ids(tokenizer, messages + [{"role": "user", "content": turns[n]}], date=date)
    spans: list[tuple[int, int]] = []
    for i in range(n):
        start = render_messages_ids(tokenizer, messages[:2 * i + 1], date=date)
        end = render_messages_ids(tokenizer, messages[:2 * i + 2], add_generation_prompt=False, date=date)
        if prompt[:len(start)] != start or prompt[:len(end)] != end or len(end) <= len(start):
            return prompt, []
        spans.append((len(start), len(end)))
    return prompt, spans


def _record_field(record: Any, name: str) -> Any:
    if isinstance(record, dict):
        return record.get(name)
    return getattr(record, name, None)


def render_training_example(tokenizer, record: Any) -> tuple[list[int], int] | None:
    """``(prompt_ids + reference_ids + [eos], prompt_len)`` for a prompt record, or None without
    a reference. ``record`` is a ``PromptRecord`` or a dict with ``turns`` and ``reference``."""
    turns = _record_field(record, "turns")
    ref = _record_field(record, "reference")
    if not turns:
        raise ValueError(f"record {_record_field(record, 'id')!r}: field 'turns' is empty")
    if ref is None:
        return None
    prompt = render_prompt_ids(tokenizer, turns[0])
    resp = tokenizer(ref, add_special_tokens=False)["input_ids"]
    return prompt + list(resp) + [int(tokenizer.eos_token_id)], len(prompt)

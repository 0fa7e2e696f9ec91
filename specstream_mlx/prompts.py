"""Prompt text from chat messages, through the tokenizer's chat template.

Shared by the CLI (``generate``) and the server, so both build the same
prompt for the same messages.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Union


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries a chat template."""
    return getattr(tokenizer, "chat_template", None) is not None


def format_messages(tokenizer, messages: List[Dict[str, str]]) -> str:
    """Prompt text for a conversation, ending where the assistant's reply starts.

    Args:
        tokenizer: mlx-lm's ``TokenizerWrapper`` (or an HF tokenizer).
        messages: ``{"role": ..., "content": ...}`` dicts with text content.

    Returns:
        The templated prompt. Without a chat template, a lone message's content
        as is, or ``role: content`` lines followed by ``assistant:``.
    """
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    if len(messages) == 1:
        return messages[0]["content"]
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines + ["assistant:"])


def format_prompt(
    tokenizer,
    prompt: Union[str, List[Dict[str, str]]],
    system_prompt: Optional[str] = None,
    ignore_chat_template: bool = False,
) -> str:
    """Prompt text for one user message (what ``specstream-mlx generate`` sends).

    Args:
        tokenizer: the tokenizer from ``load``.
        prompt: the user's text, or a list of ``{"role", "content"}`` messages.
        system_prompt: an optional system message put first (unless the
            messages already start with one).
        ignore_chat_template: return the raw text (for messages: the last one's).

    Returns:
        The templated prompt, or the raw text when the tokenizer has no chat
        template or ``ignore_chat_template`` is set.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if ignore_chat_template or not has_chat_template(tokenizer):
        return messages[-1]["content"] if messages else ""
    if system_prompt and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return format_messages(tokenizer, messages)

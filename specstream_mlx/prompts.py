"""Prompt text from chat messages, through the tokenizer's chat template.

Shared by the CLI (``generate``) and the server, so both build the same
prompt for the same messages.
"""

from __future__ import annotations

from typing import Dict, List, Optional


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
    prompt: str,
    system_prompt: Optional[str] = None,
    ignore_chat_template: bool = False,
) -> str:
    """Prompt text for one user message (what ``specstream-mlx generate`` sends).

    Args:
        tokenizer: the tokenizer from ``load``.
        prompt: the user's text.
        system_prompt: an optional system message put first.
        ignore_chat_template: return ``prompt`` unchanged.

    Returns:
        The templated prompt, or ``prompt`` itself when the tokenizer has no
        chat template or ``ignore_chat_template`` is set.
    """
    if ignore_chat_template or not has_chat_template(tokenizer):
        return prompt
    messages = [{"role": "user", "content": prompt}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return format_messages(tokenizer, messages)

"""How a chat prompt is rendered into the text and tokens the model sees.

The server renders a request's messages with this, and PPO renders the user messages of a prompt
file with it too: the held-out split of PPO hashes the rendered text that the server stored, so
both must produce the same string (and tokens) for the same message. The tokenizer is any
Hugging Face tokenizer (duck-typed: ``chat_template``, ``apply_chat_template``, ``__call__``).
"""

from __future__ import annotations


def render_messages(tokenizer, messages: list[dict[str, str]]) -> tuple[str, tuple[int, ...]]:
    """Chat messages (``{"role", "content"}``) through the chat template with the generation
    prompt, and the token ids of that text (the template already holds the special tokens)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_prompt(tokenizer, user_message: str) -> tuple[str, tuple[int, ...]]:
    """One user message as the server renders it; a tokenizer without a chat template takes the
    message as it is."""
    if getattr(tokenizer, "chat_template", None):
        return render_messages(tokenizer, [{"role": "user", "content": user_message}])
    return user_message, tuple(tokenizer(user_message, add_special_tokens=False)["input_ids"])

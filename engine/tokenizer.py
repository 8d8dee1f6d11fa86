"""Tokenizer, chat template and incremental detokenization (transformers' tokenizers)."""

from dataclasses import dataclass, field
from pathlib import Path


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Flatten OpenAI-style content parts (``[{"type": "text", "text": ...}]``) to strings.
    Raises ValueError on anything else."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] must be an object with a 'role'")
        content = m.get("content", "")
        if content is None:
            content = ""
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                        part.get("text"), str):
                    raise ValueError(f"messages[{i}].content[{j}] must be a text part")
                parts.append(part["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
        out.append({"role": m["role"], "content": content})
    return out


def apply_chat_template(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the conversation with the assistant's turn opened. Pure."""
    text = tokenizer.apply_chat_template(normalize_messages(messages), tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass
class IncrementalDetokenizer:
    """Text of a growing token list, emitted as deltas; stop strings cut it.

    ``push`` mutates the state and returns the new, safe-to-show text (a trailing
    incomplete UTF-8 sequence is held back until completed).
    """

    tokenizer: object
    stop: tuple[str, ...] = ()
    skip_special_tokens: bool = True
    include_stop_str: bool = False
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # emitted so far
    stopped_on: str | None = None

    # Decoded text of token_ids[:_read], and the window start: each push decodes only
    # token_ids[_prefix:] (a few tokens), so a push costs O(1), not O(length).
    _decoded: str = ""
    _prefix: int = 0
    _read: int = 0

    def _decode_tail(self) -> str:
        """The text of every token so far; advances the window when the tail decodes
        to complete characters (a trailing U+FFFD means a split UTF-8 sequence)."""
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        before = decode(self.token_ids[self._prefix:self._read], skip_special_tokens=skip)
        after = decode(self.token_ids[self._prefix:], skip_special_tokens=skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._decoded += after[len(before):]
            self._prefix, self._read = self._read, len(self.token_ids)
            return self._decoded
        if len(self.token_ids) - self._prefix > 16:  # nothing printable for long: move on
            self._decoded += after[len(before):].rstrip("\ufffd")
            self._prefix, self._read = self._read, len(self.token_ids)
        return self._decoded + after[len(before):]

    def push(self, token_ids: list[int]) -> str:
        self.token_ids.extend(token_ids)
        full = self._decode_tail()
        if self.stop:
            # Only the newly decoded region (plus overlap) can contain a new stop match.
            search_from = max(0, len(self.text) - max(len(s) for s in self.stop))
            best = None
            for s in self.stop:
                k = full.find(s, search_from)
                if k != -1 and (best is None or k < best[0]):
                    best = (k, s)
            if best is not None:
                k, s = best
                self.stopped_on = s
                full = full[:k + len(s)] if self.include_stop_str else full[:k]
                delta = full[len(self.text):]
                self.text = full
                return delta
            # Hold back a tail that could be the start of a stop string.
            hold = max((len(s) - 1 for s in self.stop), default=0)
            safe = full[:max(len(self.text), len(full) - hold)] if hold else full
        else:
            safe = full
        if safe.endswith("\ufffd"):
            safe = safe.rstrip("\ufffd")
        if len(safe) <= len(self.text):
            return ""
        delta = safe[len(self.text):]
        self.text = safe
        return delta

    def flush(self) -> str:
        """At the end: whatever was held back (unless a stop string cut the text)."""
        if self.stopped_on is not None:
            return ""
        full = self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip_special_tokens)
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text = self.text + delta
        return delta

"""``ByteTokenizer``: UTF-8 bytes as tokens, plus a few special tokens and a tiny chat template.

Ids ``0..255`` are the bytes; the special tokens follow (``vocab_size == 256 + len(SPECIAL_TOKENS)``):

    256 <pad>   257 <bos>   258 <eos>   259 <|system|>   260 <|user|>   261 <|assistant|>   262 <|end|>

The chat template renders each message as ``<|role|>content<|end|>`` (roles ``system``, ``user``,
``assistant``), with a leading ``<bos>``; ``add_generation_prompt=True`` appends ``<|assistant|>``:

    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        -> "<bos><|user|>hi<|end|><|assistant|>yo<|end|>"

``encode`` maps the special tokens' strings inside the text to their ids (as Hugging Face tokenizers
do with added special tokens), so a rendered conversation encodes to the special ids. The keyword
names follow the Hugging Face tokenizer methods (``add_special_tokens``, ``skip_special_tokens``,
``tokenize``, ``add_generation_prompt``), so the data layer treats both alike.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_ROLES = ("system", "user", "assistant")


class ByteTokenizer:
    """Byte-level tokenizer with ``vocab_size`` 263; see the module docstring for ids and template."""

    def __init__(self) -> None:
        self.special_ids = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._special_by_id = {i: tok for tok, i in self.special_ids.items()}
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self.pad_token_id = self.special_ids["<pad>"]
        self.bos_token_id = self.special_ids["<bos>"]
        self.eos_token_id = self.special_ids["<eos>"]
        self.pad_token, self.bos_token, self.eos_token = "<pad>", "<bos>", "<eos>"

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """UTF-8 bytes of ``text``, special-token strings mapped to their ids.

        ``add_special_tokens=True`` prepends ``<bos>`` (unless the text already starts with it).
        """
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        ids: list[int] = []
        for piece in self._special_re.split(text):
            if piece in self.special_ids:
                ids.append(self.special_ids[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        if add_special_tokens and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Inverse of :meth:`encode`; invalid UTF-8 becomes U+FFFD; ids outside the vocabulary raise."""
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            if i not in self._special_by_id:
                raise ValueError(f"ids: token id {i} outside the vocabulary [0, {self.vocab_size})")
            out.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            if not skip_special_tokens:
                out.append(self._special_by_id[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def batch_decode(self, batch: Iterable[Iterable[int]], *, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    def apply_chat_template(
        self,
        conversation: Sequence[Mapping[str, Any]],
        *,
        tokenize: bool = False,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
    ) -> Union[str, list[int]]:
        """Render messages ``{"role", "content"}`` with the template of the module docstring.

        ``continue_final_message=True`` leaves the last message open (no ``<|end|>``), for a
        response that continues a prefilled assistant turn.
        """
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
        parts = [self.bos_token]
        for i, message in enumerate(conversation):
            if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
                raise ValueError(f"conversation[{i}]: expected a mapping with 'role' and 'content'")
            role, content = message["role"], message["content"]
            if role not in CHAT_ROLES:
                raise ValueError(f"conversation[{i}].role: expected one of {CHAT_ROLES}, got {role!r}")
            if not isinstance(content, str):
                raise ValueError(f"conversation[{i}].content: expected str, got {type(content).__name__}")
            parts.append(f"<|{role}|>{content}<|end|>")
        if continue_final_message:
            if not conversation:
                raise ValueError("continue_final_message needs at least one message")
            parts[-1] = parts[-1][: -len("<|end|>")]
        if add_generation_prompt:
            parts.append("<|assistant|>")
        text = "".join(parts)
        return self.encode(text) if tokenize else text


def load_tokenizer(name: Optional[str], model: str) -> Any:
    """The tokenizer of a run: ``"byte"`` -> :class:`ByteTokenizer`; a directory -> ``AutoTokenizer``
    (local files only); ``None`` -> the model's (``ByteTokenizer`` for ``model="demo"``).

    A Hugging Face tokenizer without a pad token gets its EOS as pad (padding positions are masked).
    """
    source = name if name is not None else ("byte" if model == "demo" else model)
    if source == "byte":
        return ByteTokenizer()
    what = "tokenizer" if name is not None else "model"  # the option the path came from
    if not Path(source).is_dir():
        raise ValueError(
            f"{what}: cannot load a tokenizer from {source!r}: no such directory (expected 'byte' or a local "
            "tokenizer directory, as written by save_pretrained)"
        )
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what}: cannot load a tokenizer from the directory {source!r} ({exc})") from None
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer: {source!r} has no EOS token; responses need one to end")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok

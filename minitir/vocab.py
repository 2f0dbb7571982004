"""A compact vocabulary over a real tokenizer: the pieces a small corpus uses, renumbered 0..V-1.

With SmolLM2's 49k-entry vocabulary the output head alone costs ~40 MFLOP per training token for a
128-wide model, minutes per million tokens on two cores; the few hundred pieces a generated math corpus
and Python's outputs use cost nothing. Text is still cut by the real tokenizer, so prompts, stop strings
and tool outputs tokenize as they would for the full model. A piece outside the compact vocabulary (only
unusual tool output can hold one) becomes the last id, `unk`, which decodes to "?".
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

FILE = "compact_vocab.json"


class CompactTokenizer:
    def __init__(self, base, base_ids: list[int]):
        self.base = base
        self.base_ids = list(base_ids)                          # compact id i <-> base id base_ids[i]
        self.index = {b: i for i, b in enumerate(self.base_ids)}
        self.unk = len(self.base_ids)                           # one more id: a piece not in the vocabulary
        self.eos_token = base.eos_token
        self.eos_token_id = self.index.get(base.eos_token_id)
        self.chat_template = None

    @classmethod
    def build(cls, base, texts, extra=()) -> "CompactTokenizer":
        """The pieces of `texts` (and of `extra`) plus the base tokenizer's EOS, in base-id order."""
        ids = {base.eos_token_id}
        for t in list(texts) + list(extra):
            ids.update(base.encode(t, add_special_tokens=False))
        return cls(base, sorted(ids))

    def __len__(self):
        return len(self.base_ids) + 1

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.index.get(i, self.unk) for i in self.base.encode(text, add_special_tokens=False)]

    def __call__(self, text: str):
        return SimpleNamespace(input_ids=self.encode(text))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out, run = [], []
        for i in ids:
            if i == self.unk:
                out += [self.base.decode(run), "?"] if run else ["?"]
                run = []
            else:
                run.append(self.base_ids[i])
        return "".join(out) + (self.base.decode(run) if run else "")

    def save_pretrained(self, path):
        """The base tokenizer's files and the compact ids beside them; `load` reads both back."""
        self.base.save_pretrained(str(path))
        Path(path, FILE).write_text(json.dumps({"base_ids": self.base_ids}))

    @classmethod
    def load(cls, path) -> "CompactTokenizer":
        from transformers import AutoTokenizer
        return cls(AutoTokenizer.from_pretrained(str(path)), json.loads(Path(path, FILE).read_text())["base_ids"])

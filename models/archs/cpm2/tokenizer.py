"""CPM-2's tokenizer (BMInf `T5Tokenizer`): jieba + greedy WordPiece over
`vocab.txt`, and the prompt forms of BMInf's `generate` and `fill_blank`.

Encoding: full-width characters become half-width (Chinese punctuation kept), jieba cuts
the text, each word has ' ' and '\\n' written as U+2582 / U+2583, then greedy longest-match
pieces (no "##" continuation marks; an unmatched character is <unk>). Decoding joins the
pieces and maps U+2582 / U+2583 back.

A CPM-2 prompt is the encoder input followed by the decoder prompt (see models/archs/cpm2/model.py):
- generation (BMInf `generate`): `text <s_189>` then `<s> <s_189>`; stop at <eod>;
- blank filling (BMInf `fill_blank`): each "<span>" in the text becomes the next sentinel
  <s_0>, <s_1>, ...; the decoder prompt is `<s> <s_0>`; the answer is the blanks in order,
  separated by <s_1>, <s_2>, ...; stop at the sentinel after the last blank
  (`fill_blank_stop`), and `blanks()` splits the generated ids.
`encode(text)` appends the decoder prompt (bos=False leaves it out); special tokens written
in the text (<s_N>, <s>, <eod>, ...) become their ids.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from llm_shard.models.text.tokenizer import PanGuTokenizer, Tokenizer, TokenizerError

SPAN = "<span>"  # BMInf's blank marker in fill_blank input
SENTINELS = 190  # <s_0> ... <s_189>
GENERATE_SENTINEL = SENTINELS - 1
START, END, UNK = "<s>", "<eod>", "<unk>"
_ENC = str.maketrans(" \n", "\u2582\u2583")
_DEC = str.maketrans("\u2582\u2583", " \n")
_KEEP_FULL_WIDTH = set("，。！（）？、；：")
MAX_WORD = 200  # longer words are one <unk>, as in BMInf


def half_width(ch: str) -> str:
    """BMInf's Q2B: a full-width ASCII character (and the ideographic space) to half-width,
    except Chinese punctuation."""
    if ch in _KEEP_FULL_WIDTH:
        return ch
    code = ord(ch)
    code = 0x20 if code == 0x3000 else code - 0xFEE0
    return chr(code) if 0x20 <= code <= 0x7E else ch


def read_vocab(text: str) -> list[str]:
    """vocab.txt: one piece per line, stripped, blank lines skipped (BMInf's read_vocab)."""
    return [w for w in (line.strip() for line in text.splitlines()) if w]


class CPM2Tokenizer(Tokenizer):
    kind = "cpm2"
    file = "vocab.txt"

    def __init__(self, vocab: Sequence[str], *, bos_id: int | None = None,
                 eos_ids: Sequence[int] | None = None, add_bos: bool = True,
                 chat_template: str = "plain") -> None:
        self.pieces = list(vocab)
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        needed = [START, END, UNK] + [f"<s_{i}>" for i in range(SENTINELS)]
        missing = [p for p in needed if p not in self.ids]
        if missing:
            more = " ..." if len(missing) > 5 else ""
            raise TokenizerError(f"{self.file} lacks {missing[:5]}{more}: not CPM-2's vocabulary")
        # bos_id is the decoder start <s>: encode puts it where the decoder prompt begins
        self._init(len(self.pieces), self.ids[START] if bos_id is None else bos_id,
                      (self.ids[END],) if eos_ids is None else eos_ids, add_bos, chat_template)
        self.unk_id = self.ids[UNK]
        self.sentinel_ids = frozenset(self.ids[f"<s_{i}>"] for i in range(SENTINELS))
        specials = sorted((p for p in self.pieces if re.fullmatch(r"<[^<>\s]+>", p)),
                          key=len, reverse=True)
        self.split = re.compile("(" + "|".join(map(re.escape, [SPAN, *specials])) + ")")

    @classmethod
    def from_file(cls, path: Path, **kw) -> CPM2Tokenizer:
        return cls(read_vocab(Path(path).read_text(encoding="utf-8")), **kw)

    def sentinel(self, i: int) -> int:
        return self.ids[f"<s_{i}>"]

    def wordpiece(self, word: str) -> list[int]:
        if len(word) > MAX_WORD:
            return [self.unk_id]
        out, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                if word[start:end] in self.ids:
                    out.append(self.ids[word[start:end]])
                    start = end
                    break
            else:
                out.append(self.unk_id)
                start += 1
        return out

    def text_ids(self, text: str) -> list[int]:
        """Plain text (no specials) as BMInf's T5Tokenizer.encode gives it."""
        text = "".join(map(half_width, text))
        ids: list[int] = []
        for word in PanGuTokenizer.jieba().cut(text, cut_all=False):
            ids += self.wordpiece(word.translate(_ENC))
        return ids

    def _encode(self, text: str) -> list[int]:
        ids, span = [], 0
        for j, part in enumerate(self.split.split(text)):
            if j % 2 == 0:  # text between specials
                ids += self.text_ids(part) if part else []
            elif part == SPAN:
                ids.append(self.sentinel(span))
                span += 1
            else:
                ids.append(self.ids[part])
        return ids

    def encode(self, text: str, *, bos: bool | None = None) -> list[int]:
        """The encoder input, then (unless bos=False, or the text already holds <s>) the
        decoder prompt: blank filling when the text has blanks, else generation."""
        ids = self._encode(text)
        if not (self.add_bos if bos is None else bos) or self.bos_id in ids:
            return ids
        first = self.sentinel(0)
        if first in ids:  # blanks: "... <s_0> ... <s_1> ..." -> <s> <s_0>
            return ids + [self.bos_id, first]
        last = self.sentinel(GENERATE_SENTINEL)
        return ids + [last, self.bos_id, last]

    def fill_blank_stop(self, ids: Sequence[int]) -> int:
        """The sentinel that ends the answer of an encoded blank-filling prompt."""
        start = list(ids).index(self.bos_id) if self.bos_id in ids else len(ids)
        blanks = sum(1 for t in list(ids)[:start] if t in self.sentinel_ids)
        return self.sentinel(blanks)

    def blanks(self, generated: Sequence[int]) -> list[list[int]]:
        """Generated ids of a blank-filling answer, split at the sentinels."""
        out: list[list[int]] = [[]]
        for t in generated:
            if t in self.sentinel_ids:
                out.append([])
            elif t not in self.eos_ids:
                out[-1].append(t)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        n = len(self.pieces)  # ids past the vocab (the model's vocab may be padded): <unk>
        return "".join(self.pieces[i] if 0 <= i < n else UNK for i in ids).translate(_DEC)

    def save(self, directory: Path) -> dict:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / self.file).write_text("\n".join(self.pieces) + "\n", encoding="utf-8")
        return self._spec(file=self.file)

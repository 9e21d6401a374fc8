"""Tokenizers behind one interface: text <-> ids, BOS/EOS, chat prompts, save/load.

Kinds: "sentencepiece" (LLaMA, LLaMA-2, Atom), "pangu" (jieba + SentencePiece, PanGu-α),
"chatglm" (ChatGLM-6B's preprocessed SentencePiece) and "bpe" (anything the `tokenizers`
library runs: GGUF byte-level BPE such as SmolLM2, an HF tokenizer.json, or GPT-2-style
vocab.json + merges.txt such as MOSS's). encode() never lets a backend add specials: BOS
is added here, once, so that every kind follows the same rule.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

from llm_shard.models.errors import TokenizerError
from llm_shard.models.text import chat


class Tokenizer:
    kind: str
    vocab_size: int
    bos_id: int | None
    eos_ids: tuple[int, ...]
    add_bos: bool
    chat_template: str

    def _init(self, vocab_size: int, bos_id: int | None, eos_ids: Sequence[int], add_bos: bool,
              chat_template: str) -> None:
        self.vocab_size, self.bos_id, self.eos_ids = vocab_size, bos_id, tuple(eos_ids)
        self.add_bos, self.chat_template = add_bos and bos_id is not None, chat_template

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode(self, text: str, *, bos: bool | None = None) -> list[int]:
        ids = self._encode(text)
        # A chat template may already begin with a literal BOS; never double it.
        if (self.add_bos if bos is None else bos) and self.bos_id is not None \
                and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return chat.render(self.chat_template, messages, add_generation_prompt)

    def _spec(self, **files) -> dict:
        return {"kind": self.kind, **files, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_ids": list(self.eos_ids), "add_bos": self.add_bos,
                "chat_template": self.chat_template}

    def save(self, directory: Path) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={self.eos_ids}, add_bos={self.add_bos}, "
                f"chat_template={self.chat_template!r})")


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece; the BOS/EOS pieces ("<s>", "</s>") written in the text become ids, the
    way Meta's chat code encodes each turn separately with bos/eos around it."""

    kind = "sentencepiece"
    file = "tokenizer.model"

    def __init__(self, model: bytes, *, bos_id: int | None = 1, eos_ids: Sequence[int] = (2,),
                 add_bos: bool = True, chat_template: str = "llama2") -> None:
        import sentencepiece as spm

        self.proto = model
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        self._init(self.sp.vocab_size(), bos_id, eos_ids, add_bos, chat_template)
        self.specials = {self.sp.id_to_piece(i): i for i in (bos_id, *self.eos_ids)
                         if i is not None and self.sp.is_control(i)}
        self.split = re.compile("(" + "|".join(map(re.escape, self.specials)) + ")") \
            if self.specials else None

    @classmethod
    def from_file(cls, path: Path, **kw) -> SentencePieceTokenizer:
        return cls(Path(path).read_bytes(), **kw)

    def _encode(self, text: str) -> list[int]:
        if self.split is None:
            return self.sp.encode(text)
        ids: list[int] = []
        for part in self.split.split(text):
            ids += [self.specials[part]] if part in self.specials else self.sp.encode(part)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def save(self, directory: Path) -> dict:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / self.file).write_bytes(self.proto)
        return self._spec(file=self.file)


class PanGuTokenizer(SentencePieceTokenizer):
    """PanGu-α: jieba words joined by ' ', with the text's own spaces and
    newlines written as U+2582/U+2583 so that decode can drop the joining spaces. The vocab
    normalizes NFKC, so full-width punctuation comes back half-width; no byte fallback."""

    kind = "pangu"
    file = "vocab.model"
    _jieba = None

    def __init__(self, model: bytes, *, bos_id: int | None = None,
                 eos_ids: Sequence[int] = (9, 8), add_bos: bool = False,
                 chat_template: str = "pangu") -> None:
        super().__init__(model, bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos,
                         chat_template=chat_template)

    @classmethod
    def jieba(cls):
        if cls._jieba is None:
            import jieba

            jieba.setLogLevel(logging.WARNING)  # its "Building prefix dict" banner
            jieba.initialize()
            cls._jieba = jieba
        return cls._jieba

    def _encode(self, text: str) -> list[int]:
        words = (w.replace(" ", "\u2582").replace("\n", "\u2583")
                 for w in self.jieba().cut(text, cut_all=False))
        return self.sp.encode(" ".join(words))

    def decode(self, ids: Sequence[int]) -> str:
        text = self.sp.decode(list(ids)).replace(" ", "")
        return text.replace("\u2582", " ").replace("\u2583", "\n")


class BPETokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (byte-level BPE from a GGUF, or any HF tokenizer.json)."""

    kind = "bpe"
    file = "tokenizer.json"

    def __init__(self, tok, *, bos_id: int | None, eos_ids: Sequence[int], add_bos: bool,
                 chat_template: str) -> None:
        self.tok = tok
        self._init(tok.get_vocab_size(with_added_tokens=True), bos_id, eos_ids, add_bos,
                   chat_template)

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        # Specials stay in the text: decode is the inverse of encode; eos never reaches here.
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: Path) -> dict:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.tok.save(str(Path(directory) / self.file))
        return self._spec(file=self.file)


class ChatGLMTokenizer(SentencePieceTokenizer):
    """ChatGLM-6B v1.1's `ice_text.model`. Before SentencePiece, '\n' becomes
    <n>, a tab <|tab|> and a run of 2-80 spaces <|blank_n|>; decode undoes it. The GLM
    specials written in the text ([MASK], [gMASK], <sop>, ...) become their ids. A prompt
    ends with [gMASK] <sop>: encode appends them where BOS would go (bos=False skips them).
    (v1.0's 150528-token vocab shifted every id by 20000 image tokens: not supported.)"""

    kind = "chatglm"
    file = "ice_text.model"
    SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>",
                "<dBLOCK>")
    MAX_BLANK = 80

    def __init__(self, model: bytes, *, bos_id: int | None = None,
                 eos_ids: Sequence[int] | None = None, add_bos: bool = True,
                 chat_template: str = "chatglm") -> None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_proto=model)
        piece = {p: sp.piece_to_id(p) for p in self.SPECIALS}
        missing = [p for p, i in piece.items() if sp.id_to_piece(i) != p]
        if missing:
            raise TokenizerError(f"{self.file} lacks the GLM pieces {missing}: not ChatGLM-6B "
                                 "v1.1's tokenizer")
        super().__init__(model, bos_id=piece["<sop>"] if bos_id is None else bos_id,
                         eos_ids=(piece["<eop>"],) if eos_ids is None else eos_ids,
                         add_bos=add_bos, chat_template=chat_template)
        self.gmask_id = piece["[gMASK]"]
        self.specials = piece
        self.split = re.compile("(" + "|".join(map(re.escape, piece)) + ")")

    @classmethod
    def preprocess(cls, text: str) -> str:
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for n in range(cls.MAX_BLANK, 1, -1):
            text = text.replace(" " * n, f"<|blank_{n}|>")
        return text

    @classmethod
    def postprocess(cls, text: str) -> str:
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        for n in range(2, cls.MAX_BLANK + 1):
            text = text.replace(f"<|blank_{n}|>", " " * n)
        return text

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self.split.split(text):
            if part in self.specials:
                ids.append(self.specials[part])
            elif part:
                ids += self.sp.encode(self.preprocess(part))
        return ids

    def encode(self, text: str, *, bos: bool | None = None) -> list[int]:
        ids = self._encode(text)
        tail = [self.gmask_id, self.bos_id]
        if (self.add_bos if bos is None else bos) and ids[-2:] != tail:
            ids += tail
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.postprocess(self.sp.decode(list(ids)))


KINDS = {c.kind: c for c in (SentencePieceTokenizer, PanGuTokenizer, BPETokenizer,
                             ChatGLMTokenizer)}


def _arch_kinds() -> dict[str, type[Tokenizer]]:
    """The architectures' own tokenizer classes (`Arch.tokenizer`) by kind."""
    from llm_shard.models import all_archs

    return {a.tokenizer.kind: a.tokenizer for a in all_archs() if a.tokenizer is not None}


def load_tokenizer(directory: Path, spec: dict) -> Tokenizer:
    cls = KINDS.get(spec.get("kind")) or _arch_kinds().get(spec.get("kind"))
    if cls is None:
        raise TokenizerError(f"unknown tokenizer kind {spec.get('kind')!r}; known: "
                             f"{', '.join([*KINDS, *_arch_kinds()])}")
    missing = [k for k in ("file", "bos_id", "eos_ids", "add_bos", "chat_template")
               if k not in spec]
    if missing:
        raise TokenizerError(f"tokenizer spec lacks {', '.join(missing)}")
    path = Path(directory) / spec["file"]
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} is missing")
    kw = {k: spec[k] for k in ("bos_id", "eos_ids", "add_bos", "chat_template")}
    if cls is BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_file(str(path)), **kw)
    return cls.from_file(path, **kw)


# --- GGUF --------------------------------------------------------------------------------

def _gguf_value(reader, key: str, default=None):
    """A metadata value as a Python str/int/bool/list, read through the parts/data indices
    that every gguf version has (Field.contents() is newer than our floor)."""
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None:
        return default
    if field.types[0] == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [v for i in field.data for v in field.parts[i].tolist()]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


# llama.cpp's pre-tokenizer families (llama-vocab.cpp), as `tokenizers` pre-tokenizers.
_SPLIT_DIGITS = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_GPT2 = ("gpt2", "default", "mpt", "olmo", "jais")
_LLAMA3 = ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str):
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    if pre in _GPT2:
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _SPLIT_DIGITS:
        # Digits one by one, then GPT-2's regex: llama.cpp's two-regex split for these.
        return pt.Sequence([pt.Digits(individual_digits=True),
                            pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in _LLAMA3:
        return pt.Sequence([pt.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise TokenizerError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: "
                         f"{', '.join(_GPT2 + _SPLIT_DIGITS + _LLAMA3)}")


def tokenizer_from_gguf(reader) -> BPETokenizer:
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as HFTokenizer

    def meta(key, default=None):
        return _gguf_value(reader, key, default)

    model = meta("tokenizer.ggml.model")
    if model != "gpt2":
        raise TokenizerError(f"GGUF tokenizer model {model!r} is not supported; supported: gpt2 "
                             "(byte-level BPE)")
    tokens, types = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in meta("tokenizer.ggml.merges", [])]
    tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = _pre_tokenizer(meta("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    # Control (3) and user-defined (4) tokens match whole in raw text, as in llama.cpp; being
    # in the vocab already, each keeps its id.
    marked = list(zip(tokens, types or ()))
    tok.add_special_tokens([AddedToken(t, normalized=False) for t, ty in marked if ty == 3])
    tok.add_tokens([AddedToken(t, normalized=False) for t, ty in marked if ty == 4])
    bos = meta("tokenizer.ggml.bos_token_id")
    eos = [meta(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return BPETokenizer(tok, bos_id=bos, eos_ids=dict.fromkeys(i for i in eos if i is not None),
                        add_bos=bool(meta("tokenizer.ggml.add_bos_token", False)),
                        chat_template=chat.template_for_jinja(meta("tokenizer.chat_template"),
                                                              "plain"))


# --- Hugging Face / Meta folders ---------------------------------------------------------

def _token_id(tok, value) -> int | None:
    """tokenizer_config.json names tokens as strings or {"content": ...} dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return tok.token_to_id(value) if isinstance(value, str) else None


def gpt2_files_tokenizer(folder: Path):
    """A `tokenizers.Tokenizer` from GPT-2-style vocab.json + merges.txt (+ added_tokens.json,
    whose tokens keep their ids and match whole, as the slow GPT2Tokenizer splits them out):
    MOSS's tokenizer files."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers as pt

    try:
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        added_file = folder / "added_tokens.json"
        added = json.loads(added_file.read_text(encoding="utf-8")) if added_file.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"GPT-2 tokenizer files in {folder} are unreadable: {e}") from None
    merges = [tuple(line.split(" ")) for line in lines
              if line and not line.startswith("#version")]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise TokenizerError(f"{folder / 'merges.txt'}: line {' '.join(bad[0])!r} is not a pair")
    clash = {t: i for t, i in added.items() if vocab.get(t, i) != i}
    if clash:
        raise TokenizerError(f"added_tokens.json gives {clash} ids that vocab.json gives others")
    tok = HFTokenizer(models.BPE(vocab | added, merges))
    tok.pre_tokenizer = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False)
                            for t in sorted(added, key=added.get)])
    return tok


def _bpe_from_folder(folder: Path, default_template: str, tok=None) -> BPETokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    if tok is None:
        tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    cfg = {}
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            cfg[name] = json.loads((folder / name).read_text())
    tcfg = cfg.get("tokenizer_config.json", {})
    gen, model = cfg.get("generation_config.json", {}), cfg.get("config.json", {})
    bos = next((i for i in (_token_id(tok, tcfg.get("bos_token")), gen.get("bos_token_id"),
                            model.get("bos_token_id")) if i is not None), None)
    eos = [_token_id(tok, tcfg.get("eos_token"))]
    for more in (gen.get("eos_token_id"), model.get("eos_token_id")):
        eos += more if isinstance(more, list) else [more]
    add_bos = tcfg.get("add_bos_token")
    if add_bos is None:  # not stated: ask the file's post-processor whether it adds BOS
        add_bos = bos is not None and tok.encode("a").ids[:1] == [bos]
    template = chat.template_for_jinja(tcfg.get("chat_template"), default_template)
    return BPETokenizer(tok, bos_id=bos, eos_ids=dict.fromkeys(i for i in eos if i is not None),
                        add_bos=add_bos, chat_template=template)


def tokenizer_from_folder(folder: Path, arch: str) -> Tokenizer:
    """The tokenizer of an HF or Meta checkpoint folder. The original SentencePiece model is
    preferred to a tokenizer.json converted from it."""
    from llm_shard.models import get_arch

    folder, arch_ = Path(folder), get_arch(arch)
    if arch_.tokenizer is not None:  # the architecture's own
        looked = (arch_.tokenizer.file,)
        if (folder / arch_.tokenizer.file).is_file():
            return arch_.tokenizer.from_file(folder / arch_.tokenizer.file)
    elif arch_.name == "pangu-alpha":
        looked = ("vocab.model",)
        if (folder / "vocab.model").is_file():
            return PanGuTokenizer.from_file(folder / "vocab.model")
    elif arch_.name == "chatglm":
        looked = ("ice_text.model",)
        if (folder / "ice_text.model").is_file():
            return ChatGLMTokenizer.from_file(folder / "ice_text.model")
    else:
        looked = ("tokenizer.model", "tokenizer.json", "vocab.json + merges.txt")
        if (folder / "tokenizer.model").is_file():
            return SentencePieceTokenizer.from_file(folder / "tokenizer.model",
                                                    chat_template=arch_.chat_template)
        if (folder / "tokenizer.json").is_file():
            return _bpe_from_folder(folder, arch_.chat_template)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return _bpe_from_folder(folder, arch_.chat_template, gpt2_files_tokenizer(folder))
        if arch_.name == "rwkv" and (folder / "20B_tokenizer.json").is_file():
            # ChatRWKV's Raven tokenizer beside a .pth (GPT-NeoX 20B, <|endoftext|> = 0)
            from tokenizers import Tokenizer as HFTokenizer

            tok = HFTokenizer.from_file(str(folder / "20B_tokenizer.json"))
            return BPETokenizer(tok, bos_id=None, eos_ids=(0,), add_bos=False,
                                chat_template=arch_.chat_template)
    raise TokenizerError(f"no tokenizer in {folder}: looked for {', '.join(looked)}")


# --- streaming ---------------------------------------------------------------------------

class StreamDecoder:
    """Turns ids into text pieces as they come (vLLM's incremental detokenizer): decode a
    short window of ids with and without the newest, emit the difference, and hold it back
    while it ends in U+FFFD, an incomplete UTF-8 sequence split across tokens."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.ids = tok, []
        self.prefix = self.read = 0  # ids[prefix:read] were emitted, and give the context

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """What is still held back at the end of the stream (a dangling partial character)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

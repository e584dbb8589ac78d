"""Caption tokenizers, trained on the caption corpus (no downloads): BPE with Hugging Face `tokenizers`, or bytes.

Both give ids [SOT] caption [EOT] [PAD]... of a fixed `context_length` (the text Transformer's
positions; a caption that does not fit is cut and still ends in [EOT], which the text tower pools).

- "bpe": a byte-pair-encoding vocabulary learned from the training captions (lower-cased, split on
  whitespace and punctuation). Short sequences: a caption of ten words is about a dozen ids.
- "byte": the UTF-8 bytes, ids 4..259; needs no training and no extra package, but sequences are
  about five times longer (and the text tower's cost with them).

The tokenizer is part of the model: `save` writes it (OUT/tokenizer.json, a file Hugging Face
`Tokenizer.from_file` reads for "bpe"), `load_tokenizer` reads it back on resume and evaluation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from util.errors import DataFileError, MissingFileError

# Special ids, the same for both kinds: pad 0 (so a zero-filled row is all padding), then start/end/unknown.
PAD, SOT, EOT, UNK = 0, 1, 2, 3
SPECIALS = ("[PAD]", "[SOT]", "[EOT]", "[UNK]")
KINDS = ("bpe", "byte")
_BYTE_OFFSET = len(SPECIALS)


class CaptionTokenizer:
    """Text -> fixed-length id rows; picklable (it travels to the data workers)."""

    def __init__(self, kind: str, hf_json: str | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"tokenizer kind must be one of {KINDS}, got {kind!r}")
        if kind == "bpe" and hf_json is None:
            raise ValueError("a bpe tokenizer needs its trained vocabulary (train_tokenizer or load_tokenizer)")
        self.kind, self.hf_json = kind, hf_json
        self._hf = None  # built lazily: the Rust object is rebuilt from JSON in each worker

    @property
    def vocab_size(self) -> int:
        """Number of ids (embedding rows the text tower needs)."""
        if self.kind == "byte":
            return _BYTE_OFFSET + 256
        return self._backend().get_vocab_size(with_added_tokens=True)

    def _backend(self):
        if self._hf is None:
            from tokenizers import Tokenizer

            self._hf = Tokenizer.from_str(self.hf_json)
        return self._hf

    def __getstate__(self) -> dict:
        return {"kind": self.kind, "hf_json": self.hf_json}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["kind"], state["hf_json"])

    def ids(self, text: str) -> list[int]:
        """Content ids of one caption, without [SOT]/[EOT]."""
        if self.kind == "byte":
            return [b + _BYTE_OFFSET for b in text.encode("utf-8")]
        return self._backend().encode(text, add_special_tokens=False).ids

    def encode(self, texts: Iterable[str], context_length: int, drop_ratio: float = 0.0,
               rng: np.random.Generator | None = None) -> np.ndarray:
        """int64 [N, context_length] rows [SOT] ids [EOT] [PAD]...; `drop_ratio` removes that share of each
        caption's content ids (FLIP/MAC text masking: the visible ids are packed, order kept), drawn from `rng`."""
        if context_length < 3:
            raise ValueError(f"context_length {context_length} leaves no room for a word between [SOT] and [EOT]")
        texts = list(texts)
        out = np.full((len(texts), context_length), PAD, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.ids(text)[: context_length - 2]
            if drop_ratio > 0 and len(ids) > 1:
                if rng is None:
                    raise ValueError("text masking draws which ids to drop: pass rng")
                keep = len(ids) - int(round(len(ids) * drop_ratio))
                chosen = np.sort(rng.permutation(len(ids))[:max(1, keep)])
                ids = [ids[i] for i in chosen]
            out[row, : len(ids) + 2] = [SOT, *ids, EOT]
        return out

    def decode(self, row: Iterable[int]) -> str:
        """The text of an id row (specials and padding dropped)."""
        ids = [int(i) for i in row if int(i) >= len(SPECIALS)]
        if self.kind == "byte":
            return bytes(i - _BYTE_OFFSET for i in ids).decode("utf-8", errors="replace")
        return self._backend().decode(ids)

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer atomically (bpe: Hugging Face's tokenizer.json; byte: a one-line marker)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = self.hf_json if self.kind == "bpe" else json.dumps({"mae_st_tokenizer": "byte"})
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path


def train_tokenizer(captions: Iterable[str], kind: str = "bpe", vocab_size: int = 1000) -> CaptionTokenizer:
    """A tokenizer for this corpus: BPE learned from `captions` (at most `vocab_size` ids), or bytes."""
    if kind == "byte":
        return CaptionTokenizer("byte")
    if kind != "bpe":
        raise ValueError(f"tokenizer kind must be one of {KINDS}, got {kind!r}")
    try:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    except ImportError as exc:  # the byte tokenizer needs nothing
        raise ImportError("--tokenizer bpe needs the `tokenizers` package (pip install -r requirements.txt), "
                          "or use --tokenizer byte") from exc
    # "##" marks a piece that continues a word, so decode() can glue pieces back into words.
    tok = Tokenizer(models.BPE(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  continuing_subword_prefix="##")
    tok.train_from_iterator(list(captions), trainer=trainer)
    for i, name in enumerate(SPECIALS):  # the fixed ids the text tower and encode() rely on
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"tokenizers gave {name} id {tok.token_to_id(name)}, expected {i}")
    return CaptionTokenizer("bpe", tok.to_str())


# What to do about a damaged tokenizer file: the text tower was trained with exactly that tokenizer.
_FIX = ("it is part of the trained model: put back this run's own tokenizer.json (a copy from where the run was "
        "made or backed up), or start a new --output_dir, where a new one is trained")


def load_tokenizer(path: str | Path) -> CaptionTokenizer:
    """Read what `CaptionTokenizer.save` wrote; anything else is a DataFileError naming the file (and line)."""
    path = Path(path)
    if not path.is_file():  # a FIFO or folder is not a file either: never opened
        raise MissingFileError(f"no tokenizer at {path}: a video-text run writes OUT/tokenizer.json when it starts")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataFileError(f"{path}:{line}: not a tokenizer file (bytes that are not UTF-8 text); {_FIX}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFileError(f"{path}:{exc.lineno}: not a tokenizer file (not JSON: {exc.msg}); {_FIX}") from None
    except RecursionError:  # json decodes nested arrays and objects recursively
        raise DataFileError(f"{path}: not a tokenizer file (JSON nested too deeply); {_FIX}") from None
    if not isinstance(data, dict):
        raise DataFileError(f"{path}: not a tokenizer file (it holds a JSON {type(data).__name__}, not an object); "
                            f"{_FIX}")
    if data.get("mae_st_tokenizer") == "byte":
        return CaptionTokenizer("byte")
    if "model" not in data:
        raise DataFileError(f"{path} is neither a Hugging Face tokenizer.json nor a byte-tokenizer marker; {_FIX}")
    tok = CaptionTokenizer("bpe", text)
    try:  # here, not lazily in a data worker, where the error would name no file
        tok._backend()
    except Exception as exc:  # tokenizers raises its own Exception type for every malformed field
        raise DataFileError(f"{path}: not a tokenizer Hugging Face can read ({str(exc)[:200]}); {_FIX}") from None
    return tok

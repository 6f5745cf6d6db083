"""CLIP's byte-level BPE tokenizer without torch: the same ids as open_clip's SimpleTokenizer
(clean="lower", no reduction), as int64 numpy arrays.

Text is cleaned (ftfy fix, HTML unescaped twice, whitespace collapsed, lower-cased), split with CLIP's
pattern (contractions, letter runs, single digits, punctuation runs), each piece's UTF-8 bytes mapped to
printable characters, merged by BPE rank, and framed by <start_of_text> ... <end_of_text>. Sequences
longer than the context are cut and end with <end_of_text>; shorter ones are padded with 0."""

from __future__ import annotations

import gzip
import html
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np
import regex

from surgeon.core.errors import CorruptInput, NotFound
from surgeon.core.paths import read_json

SOT = "<start_of_text>"
EOT = "<end_of_text>"
N_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes x 2 (with and without </w>), merges, 2 specials
DEFAULT_CONTEXT_LENGTH = 77


@lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    """Each byte -> one printable unicode character: printable Latin-1 bytes map to themselves, the others
    (controls, space, soft hyphen...) to code points from 256 upwards, in byte order. The dict order (the
    printable bytes first, then the others) is the order of the first 256 vocabulary entries."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """`tokenizer(["a photo", ...])` -> int64 [N, context_length]."""

    def __init__(self, vocab_file: Path | str, context_length: int = DEFAULT_CONTEXT_LENGTH):
        if int(context_length) < 2:
            raise CorruptInput(f"context_length must be at least 2, got {context_length}")
        self.context_length = int(context_length)
        merges = _read_merges(Path(vocab_file))
        symbols = list(byte_to_char().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges] + [SOT, EOT]
        self.encoder = {token: index for index, token in enumerate(vocab)}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.sot_id = self.encoder[SOT]
        self.eot_id = self.encoder[EOT]
        self._bytes = byte_to_char()
        self._cache: dict[str, list[int]] = {SOT: [self.sot_id], EOT: [self.eot_id]}
        specials = "|".join(regex.escape(t) for t in (SOT, EOT))
        self._pattern = regex.compile(
            specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
        )

    @classmethod
    def from_spec(cls, spec_file: Path) -> ClipTokenizer:
        """From an export's clip_tokenizer.json: {"type": "clip-bpe", "context_length": N, "vocab_file": NAME}
        (the vocabulary file is looked up next to the spec)."""
        spec_file = Path(spec_file)
        spec = read_json(spec_file, "tokenizer settings")
        if not isinstance(spec, dict) or spec.get("type") != "clip-bpe":
            kind = spec.get("type") if isinstance(spec, dict) else None
            raise CorruptInput(f"{spec_file}: unsupported tokenizer type {kind!r} (only 'clip-bpe')")
        name = spec.get("vocab_file") or "bpe_simple_vocab_16e6.txt.gz"
        if Path(name).name != name:
            raise CorruptInput(f"{spec_file}: vocab_file must be a file name next to it, got {name!r}")
        return cls(spec_file.parent / name, int(spec.get("context_length") or DEFAULT_CONTEXT_LENGTH))

    def _bpe(self, piece: str) -> list[int]:
        """One pre-token (already byte-mapped) -> ids, merging the lowest-ranked adjacent pair everywhere
        (left to right, no overlaps) until no known pair remains."""
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        word = [*piece[:-1], piece[-1] + "</w>"]
        while len(word) > 1:
            best, best_rank = None, None
            for pair in zip(word, word[1:], strict=False):
                rank = self.ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == best[0] and word[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.encoder[token] for token in word]
        if len(self._cache) < 100_000:
            self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without <start_of_text>/<end_of_text> and without truncation."""
        ids: list[int] = []
        for piece in self._pattern.findall(clean_text(text)):
            if piece in (SOT, EOT):
                ids.extend(self._cache[piece])
                continue
            ids.extend(self._bpe("".join(self._bytes[b] for b in piece.encode("utf-8"))))
        return ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        length = int(context_length or self.context_length)
        out = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot_id
            out[row, : len(ids)] = ids
        return out


def _read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
    except FileNotFoundError:
        raise NotFound(f"BPE vocabulary not found: {path}") from None
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise CorruptInput(f"BPE vocabulary {path} is unreadable: {err}") from None
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]  # line 0 is a version header
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise CorruptInput(f"BPE vocabulary {path} is not CLIP's: expected {N_MERGES} merge pairs")
    return merges  # type: ignore[return-value]

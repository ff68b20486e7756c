"""Writes the small byte-level BPE tokenizers committed under ``neu_det_pipeline/testing/assets``.

Both hold the full 256-symbol byte alphabet, so any text tokenises (falling back to single bytes),
plus merges learned by plain BPE on a short list of words common in NEU-DET prompts and captions,
so typical prompts stay far below CLIP's 77-token limit. The output is deterministic and a test
regenerates it and compares bytes with the committed files, so edit this module, never the files:

    python -m neu_det_pipeline.testing.make_tokenizer_assets [DIR]
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
CLIP_TOKENIZER = "clip_tokenizer"
GPT2_TOKENIZER = "gpt2_tokenizer"

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_MAX_LENGTH = 77
CLIP_END_OF_WORD = "</w>"
# OPT's layout: these four come first, "</s>" is both BOS and EOS (OPTConfig: pad 1, bos 2, eos 2).
OPT_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")

PROMPT_WORDS = (
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "image", "close", "up",
    "view", "top", "grayscale", "gray", "black", "white", "dark", "bright", "light", "high",
    "resolution", "detailed", "texture", "steel", "strip", "surface", "metal", "hot", "rolled",
    "industrial", "inspection", "camera", "sample", "background", "defect", "defects", "crazing",
    "inclusion", "inclusions", "patches", "patch", "pitted", "pits", "scale", "scratches", "scratch",
    "crack", "cracks", "fine", "network", "spots", "spot", "irregular", "elongated", "line", "lines",
    "shallow", "deep", "small", "large", "rough", "smooth", "neu", "det",
)  # fmt: skip


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character (printable bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    next_free = 256
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(next_free)
            next_free += 1
    return mapping


def learn_bpe_merges(words: Iterable[list[str]]) -> list[tuple[str, str]]:
    """Plain BPE run to completion: merge the most frequent adjacent pair (ties: smallest pair) until
    every word is a single symbol."""
    symbols_per_word = [list(word) for word in words]
    merges: list[tuple[str, str]] = []
    while True:
        pair_counts = Counter(pair for symbols in symbols_per_word for pair in zip(symbols, symbols[1:]))
        if not pair_counts:
            return merges
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        symbols_per_word = [_apply_merge(symbols, best) for symbols in symbols_per_word]


def _apply_merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if tuple(symbols[i : i + 2]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def _byte_symbols(text: str) -> list[str]:
    byte_map = bytes_to_unicode()
    return [byte_map[byte] for byte in text.encode("utf-8")]


def _vocab(tokens: Iterable[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))  # two merges can spell the same token
    return vocab


def clip_tokenizer_files() -> dict[str, Any]:
    """CLIP layout: bytes, bytes + ``</w>`` (word ends), merged tokens, then BOS and EOS last."""
    alphabet = list(bytes_to_unicode().values())
    words = [[*symbols[:-1], symbols[-1] + CLIP_END_OF_WORD] for symbols in map(_byte_symbols, PROMPT_WORDS)]
    merges = learn_bpe_merges(words)
    word_ends = [symbol + CLIP_END_OF_WORD for symbol in alphabet]
    vocab = _vocab([*alphabet, *word_ends, *(a + b for a, b in merges), CLIP_BOS, CLIP_EOS])
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": CLIP_BOS,
        "eos_token": CLIP_EOS,
        "unk_token": CLIP_EOS,
        "pad_token": CLIP_EOS,
        # Without it model_max_length is "infinite" and padding="max_length" (as diffusers pads) breaks.
        "model_max_length": CLIP_MAX_LENGTH,
    }
    return {"vocab.json": vocab, "merges.txt": merges, "tokenizer_config.json": config}


def gpt2_tokenizer_files() -> dict[str, Any]:
    """OPT layout (GPT2Tokenizer): OPT's special tokens, bytes, then merged tokens; words carry GPT-2's
    leading-space symbol because they follow a space in captions."""
    space = bytes_to_unicode()[ord(" ")]
    merges = learn_bpe_merges([space, *_byte_symbols(word)] for word in PROMPT_WORDS)
    vocab = _vocab([*OPT_SPECIAL_TOKENS, *bytes_to_unicode().values(), *(a + b for a, b in merges)])
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": True,  # OPT was trained with "</s>" prepended to every sequence
        "bos_token": "</s>",
        "eos_token": "</s>",
        "unk_token": "</s>",
        "pad_token": "<pad>",
    }
    return {"vocab.json": vocab, "merges.txt": merges, "tokenizer_config.json": config}


def _serialise(name: str, content: Any) -> str:
    if name == "merges.txt":
        return "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in content)
    return json.dumps(content, indent=2, ensure_ascii=False) + "\n"


def write_tokenizer_assets(assets_dir: str | Path = ASSETS_DIR) -> list[Path]:
    """Write both tokenizer folders under ``assets_dir``; returns the files written."""
    written = []
    for folder, files in ((CLIP_TOKENIZER, clip_tokenizer_files()), (GPT2_TOKENIZER, gpt2_tokenizer_files())):
        target = Path(assets_dir) / folder
        target.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            path = target / name
            path.write_bytes(_serialise(name, content).encode("utf-8"))
            written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_tokenizer_assets(*sys.argv[1:2]):
        print(written_path)

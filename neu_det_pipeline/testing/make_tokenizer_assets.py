"""Writes the small byte-level BPE tokenizer committed under ``neu_det_pipeline/testing/assets``: the tiny
BLIP-2's OPT tokenizer (the real one, 50265 ids, is not available offline; the tiny CLIP models use the real
CLIP tokenizer, see :mod:`neu_det_pipeline.captions.clip_tokens`).

It holds the full 256-symbol byte alphabet, so any text tokenises (falling back to single bytes),
plus merges learned by plain BPE on a short list of words common in NEU-DET prompts and captions.
The output is deterministic and a test regenerates it and compares bytes with the committed files,
so edit this module, never the files:

    python -m neu_det_pipeline.testing.make_tokenizer_assets [DIR]
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from neu_det_pipeline.captions.clip_tokens import bytes_to_unicode

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
GPT2_TOKENIZER = "gpt2_tokenizer"

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
    """Write the tokenizer folder under ``assets_dir``; returns the files written."""
    target = Path(assets_dir) / GPT2_TOKENIZER
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in gpt2_tokenizer_files().items():
        path = target / name
        path.write_bytes(_serialise(name, content).encode("utf-8"))
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_tokenizer_assets(*sys.argv[1:2]):
        print(written_path)

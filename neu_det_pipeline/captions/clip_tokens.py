"""The real CLIP tokenizer, offline, and the check that prompts fit CLIP's 77-token context.

SD 1.5 and SDXL read every prompt through CLIP's BPE tokenizer (49408 ids; 77 positions including the start
and end tokens) and silently drop whatever lies beyond. open_clip ships that BPE vocabulary
(`open_clip/bpe_simple_vocab_16e6.txt.gz`), so the transformers tokenizer of `openai/clip-vit-large-patch14`
(the one in SD 1.5's and SDXL's `tokenizer/` folders) is rebuilt from it here, without a download.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLIP_CONTEXT_LENGTH = 77
"""Token positions of CLIP's text encoder, start and end tokens included."""
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_END_OF_WORD = "</w>"
CLIP_BPE_MERGES = 49152 - 256 - 2
"""Merges CLIP uses from the BPE file: 256 bytes + 256 word-final bytes + merges + 2 special tokens = 49408 ids."""
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CUT_EXAMPLES = 3
"""Cut prompts named in a step summary."""


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


def open_clip_bpe_path() -> Path:
    """open_clip's copy of CLIP's BPE vocabulary (found without importing open_clip, which imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("open_clip is not installed: it ships CLIP's BPE vocabulary (pip install open_clip_torch)")
    return Path(spec.origin).parent / BPE_FILE


def clip_vocabulary() -> tuple[dict[str, int], list[str]]:
    """(token -> id, merges) of the real CLIP tokenizer, in the layout of the hub's vocab.json / merges.txt:
    bytes, word-final bytes, merged tokens, then the start and end tokens (ids 49406, 49407)."""
    lines = gzip.decompress(open_clip_bpe_path().read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : CLIP_BPE_MERGES + 1]  # line 0 is the file's version header
    alphabet = list(bytes_to_unicode().values())
    tokens = [*alphabet, *(symbol + CLIP_END_OF_WORD for symbol in alphabet), *("".join(m.split()) for m in merges)]
    tokens += [CLIP_BOS, CLIP_EOS]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_clip_vocabulary(folder: str | Path) -> None:
    """Write `vocab.json` and `merges.txt` of the real CLIP tokenizer into `folder` (transformers 5 reads them
    only through `CLIPTokenizer.from_pretrained(folder)`; the constructor's file arguments are ignored)."""
    vocab, merges = clip_vocabulary()
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{merge}\n" for merge in merges), encoding="utf-8")


# The special tokens of SD 1.5's tokenizer/tokenizer_config.json (unk and pad are the end token).
CLIP_TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "bos_token": CLIP_BOS,
    "eos_token": CLIP_EOS,
    "unk_token": CLIP_EOS,
    "pad_token": CLIP_EOS,
    "do_lower_case": True,
    "model_max_length": CLIP_CONTEXT_LENGTH,
}


@functools.lru_cache(maxsize=1)
def _base_clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="clip-tokenizer-") as folder:
        write_clip_vocabulary(folder)
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps(CLIP_TOKENIZER_CONFIG), encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder)


def clip_tokenizer(added_tokens: Iterable[str] = ()) -> Any:
    """The real CLIP tokenizer (SD 1.5's and SDXL's), with `added_tokens` (Step 1's class tokens) each one id."""
    import copy

    tokenizer = copy.deepcopy(_base_clip_tokenizer())
    tokenizer.add_tokens(sorted(set(added_tokens)))
    return tokenizer


@dataclass(frozen=True)
class PromptLengths:
    """How the prompts of a step fare against CLIP's context: which ones the text encoder would cut."""

    checked: int
    longest: int
    """Tokens of the longest prompt, start and end tokens included."""
    cut: list[tuple[str, int]]
    """(prompt, its token count) of every prompt over the limit, in input order."""

    def summary(self) -> dict[str, Any]:
        return {
            "limit": CLIP_CONTEXT_LENGTH,
            "prompts_checked": self.checked,
            "longest_prompt_tokens": self.longest,
            "prompts_cut": len(self.cut),
            "cut_examples": [{"prompt": prompt, "tokens": tokens} for prompt, tokens in self.cut[:CUT_EXAMPLES]],
        }

    def warning(self, what: str) -> str | None:
        """One console line when prompts are cut, else None."""
        if not self.cut:
            return None
        prompt, tokens = self.cut[0]
        return (
            f"{len(self.cut)} of {self.checked} {what} exceed CLIP's {CLIP_CONTEXT_LENGTH} tokens and are cut by the "
            f"text encoder (longest {self.longest}); e.g. {tokens} tokens: {prompt!r}"
        )


def check_prompt_lengths(prompts: Sequence[str], added_tokens: Iterable[str] = ()) -> PromptLengths:
    """Count each distinct prompt's CLIP tokens (start and end included; each of `added_tokens` counts as one,
    as after Step 1 adds them) and list those over :data:`CLIP_CONTEXT_LENGTH`."""
    distinct = list(dict.fromkeys(prompts))
    if not distinct:
        return PromptLengths(checked=0, longest=0, cut=[])
    tokenizer = clip_tokenizer(added_tokens)
    counts = [len(ids) for ids in tokenizer(distinct, truncation=False, verbose=False).input_ids]
    cut = [(prompt, count) for prompt, count in zip(distinct, counts, strict=True) if count > CLIP_CONTEXT_LENGTH]
    return PromptLengths(checked=len(distinct), longest=max(counts), cut=cut)

"""CLIP's byte-level BPE tokenizer, built on the `tokenizers` library (no transformers import).

It reproduces transformers 5's `CLIPTokenizer(prompts, padding="max_length", max_length=77,
truncation=True)`: NFC, whitespace runs collapsed to one space, lower case, CLIP's split regex,
byte-level BPE with a "</w>" end-of-word suffix, then bos + tokens + eos, padded with the pad id.
transformers 5 does not run ftfy / html unescaping for CLIP (only its old slow tokenizer did),
so neither do we.

A model's `tokenizer/` folder holds either vocab.json + merges.txt (the SD1.5 repo) or only
tokenizer.json (what transformers 5 `save_pretrained` writes); both load with `from_folder`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from fastdiff.weights import ModelFileError, read_config

log = logging.getLogger("fastdiff")

# The CLIP BPE vocabulary shipped with fastdiff (the same 49408 tokens SD1.x uses).
BUNDLED_VOCAB = Path(__file__).parent / "assets" / "clip-tokenizer"

# CLIP's pre-tokeniser: the special tokens, English contractions, letter runs, single digits,
# and runs of other non-space characters; everything else (whitespace) is dropped.
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_END_OF_WORD = "</w>"
_DEFAULTS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}


def _added_token(value) -> AddedToken:
    """A token as the config files write it: a plain string, or an AddedToken dict whose flags
    (normalized, lstrip, ...) change how it is matched in a prompt, as transformers reads it."""
    if isinstance(value, AddedToken):
        return value
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    return AddedToken(
        value["content"],
        single_word=value.get("single_word", False),
        lstrip=value.get("lstrip", False),
        rstrip=value.get("rstrip", False),
        normalized=value.get("normalized", False),
        special=value.get("special", True),
    )


def _read_json(path: Path) -> dict:
    """An optional JSON file of the folder: {} when absent, ModelFileError naming it when damaged."""
    return read_config(path) if path.is_file() else {}


def _merges_from_json(merges: list) -> list[tuple[str, str]]:
    """tokenizer.json stores merges as "a b" strings (older files) or [a, b] pairs (newer)."""
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


class CLIPTokenizer:
    """Prompts -> padded CLIP input ids [B, max_length]."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        bos_token: str | AddedToken = _DEFAULTS["bos_token"],
        eos_token: str | AddedToken = _DEFAULTS["eos_token"],
        unk_token: str | AddedToken = _DEFAULTS["unk_token"],
        pad_token: str | AddedToken = _DEFAULTS["pad_token"],
        added_tokens: Sequence[AddedToken] = (),
        max_length: int = 77,
    ):
        special = {"bos": bos_token, "eos": eos_token, "unk": unk_token, "pad": pad_token}
        special = {name: _added_token(tok) for name, tok in special.items()}
        for name, tok in special.items():
            if tok.content not in vocab:
                raise ValueError(f"{name} token {tok.content!r} is not in the vocabulary")
        if max_length < 2:
            raise ValueError(f"max_length={max_length}: needs room for bos and eos")
        self.bos_id, self.eos_id, self.pad_id = (vocab[special[k].content] for k in ("bos", "eos", "pad"))
        self.max_length = max_length
        self.vocab_size = len(vocab)

        bpe = BPE(
            vocab,
            merges,
            unk_token=special["unk"].content,
            continuing_subword_prefix="",
            end_of_word_suffix=_END_OF_WORD,
            fuse_unk=False,
        )
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        # Special tokens written in a prompt map to their own ids and split the text around them,
        # as in transformers: the file's added tokens first, then bos, eos, unk, pad (a later
        # token with the same text replaces the earlier one's matching flags).
        tok.add_special_tokens([*added_tokens, *special.values()])
        self._tok = tok

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "CLIPTokenizer":
        """Load a `tokenizer/` folder: vocab.json + merges.txt, or tokenizer.json alone.

        Special tokens and model_max_length come from tokenizer_config.json and
        special_tokens_map.json when present (the latter wins, as in transformers).
        """
        folder = Path(path).expanduser()
        vocab_file, merges_file, json_file = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
        config = _read_json(folder / "tokenizer_config.json")
        # tokenizer_config.json's added_tokens_decoder: {"49406": {"content": ..., ...}, ...}
        added = [v for _, v in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0]))]
        if vocab_file.is_file() and merges_file.is_file():
            try:
                vocab, merges = BPE.read_file(str(vocab_file), str(merges_file))
            except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a damaged file
                raise ModelFileError(
                    f"{vocab_file} / {merges_file}: not a readable BPE vocabulary ({e}); restore the files from the model's source"
                ) from None
        elif json_file.is_file():
            spec = _read_json(json_file)
            model = spec.get("model", {})
            if model.get("type") != "BPE" or model.get("end_of_word_suffix") != _END_OF_WORD:
                raise ValueError(f"{json_file}: not a CLIP byte-level BPE tokenizer (model type {model.get('type')!r})")
            vocab, merges = model["vocab"], _merges_from_json(model["merges"])
            added = spec.get("added_tokens", []) + added
        else:
            raise FileNotFoundError(f"{folder}: no tokenizer found (expected vocab.json + merges.txt, or tokenizer.json)")

        special = {k: config[k] for k in _DEFAULTS if config.get(k) is not None}
        special.update({k: v for k, v in _read_json(folder / "special_tokens_map.json").items() if k in _DEFAULTS})
        tokens = {k: _added_token(special.get(k, default)) for k, default in _DEFAULTS.items()}
        max_length = int(config.get("model_max_length", 77))
        if max_length > 100_000:  # transformers' "no limit" sentinel (VERY_LARGE_INTEGER)
            max_length = 77
        return cls(vocab, merges, **tokens, added_tokens=[_added_token(t) for t in added], max_length=max_length)

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, without bos/eos, not truncated."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Ids -> text, words separated by single spaces (CLIP keeps no original spacing)."""
        return self._tok.decode(ids, skip_special_tokens=True).replace(_END_OF_WORD, " ").strip()

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """int64 ids [B, max_length]: bos + tokens + eos, truncated to fit, then padded with pad."""
        if isinstance(prompts, str):
            prompts = [prompts]
        room = self.max_length - 2  # tokens that fit between bos and eos
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)  # [B, 77]
        for i, enc in enumerate(self._tok.encode_batch(list(prompts), add_special_tokens=False)):
            tokens = enc.ids
            if len(tokens) > room:
                dropped = self.decode(tokens[room:])
                words = dropped.split()
                log.warning(
                    "prompt truncated to the text encoder's %d tokens; dropped %d tokens (%d characters) "
                    "starting %r",
                    self.max_length,
                    len(tokens) - room,
                    len(dropped),
                    " ".join(words[:8]) + (" ..." if len(words) > 8 else ""),
                )
                tokens = tokens[:room]
            row = [self.bos_id, *tokens, self.eos_id]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids

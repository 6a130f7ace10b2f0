"""Convert CLIP's BPE merge list (open_clip's bpe_simple_vocab_16e6.txt.gz) to vocab.json + merges.txt.

The SD1.x text encoder uses OpenAI's CLIP BPE vocabulary (49408 tokens). It ships inside the
open-clip-torch wheel on PyPI; this script turns it into the Hugging Face file pair that
`fastdiff.tokenizer` (and transformers' CLIPTokenizer) read. Run once; its output is committed
under fastdiff/assets/clip-tokenizer/:

    pip download --no-deps open-clip-torch -d /tmp/oc
    unzip -o /tmp/oc/open_clip_torch-*.whl 'open_clip/bpe_simple_vocab_16e6.txt.gz' -d /tmp/oc
    python training/make_clip_vocab.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz
"""

import gzip
import json
import sys
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48894 merges of the list


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def main(src: str, out: str = "fastdiff/assets/clip-tokenizer") -> None:
    lines = gzip.open(src, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : N_MERGES + 1]]
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408, len(tokens)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    print(f"wrote {len(tokens)} tokens and {len(merges)} merges to {out_dir}")


if __name__ == "__main__":
    main(*sys.argv[1:])

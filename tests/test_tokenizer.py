"""fastdiff.tokenizer vs transformers' CLIPTokenizer (padding="max_length", truncation=True)."""

import json
import logging
import random
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

from fastdiff.tokenizer import BUNDLED_VOCAB, CLIPTokenizer



LONG = " ".join(f"word{i} and more, stuff" if i % 7 else "a very detailed castle" for i in range(200))

PROMPTS = [
    "",
    " ",
    "a photo of a cat",
    "A Photo Of A CAT",
    "  leading spaces",
    "trailing spaces   ",
    "many     inner      spaces",
    "line one\nline two\n\nline three",
    "tabs\tbetween\twords",
    "\t\n mixed \r\n whitespace \u00a0 nbsp \u3000 ideographic",
    "café crème brûlée",
    "Cafe\u0301 with a combining accent",  # NFC turns e + U+0301 into é
    "naïve façade Ångström Øresund Straße",
    "東京の夜景、ネオンの光",
    "一只可爱的猫在花园里",
    "서울의 밤거리",
    "Москва зимой, снег",
    "Αθήνα, ελληνικά",
    "עברית וערבית: مرحبا بالعالم",
    "हिन्दी में एक वाक्य",
    "emoji 🐱🐶🦄 and 👩‍👩‍👧 family and 🇫🇷 flag",
    "🎨🖌️✨",
    "punctuation!!! ??? ... ,,, ;;; :::",
    "quotes \"double\" 'single' `back` «guillemets» “curly” ‘curly’",
    "brackets (round) [square] {curly} <angle>",
    "a photo of a cat, 4k, (masterpiece:1.2), [[best quality]]",
    "math 1+1=2, 3*4/5 - 6^7 % 8",
    "numbers 1234567890 and 3.14159 and 1,000,000",
    "year 2024, 16:9 aspect, 50mm f/1.8",
    "contractions: don't won't it's we're they've I'm you'll he'd",
    "DON'T SHOUT IT'S LOUD",
    "email me@example.com and url https://example.com/a?b=c&d=e",
    "hashtags #sunset #beach @user",
    "under_score and-dash and/slash and\\backslash",
    "$100 €50 £30 ¥1000 ₹500",
    "degrees 25°C ±3 µm ½ ¼ ²³",
    "special <|startoftext|> inside",
    "special <|endoftext|> inside",
    "upper <|ENDOFTEXT|> not special",
    "</w> suffix text",
    "ALL CAPS PROMPT WITH NUMBERS 123",
    "MiXeD cAsE wOrDs",
    "ﬁligree ligature ﬀ",  # compatibility characters: NFC keeps them
    "full-width ＡＢＣ１２３",
    "zero\u200bwidth\u200bspace",
    "control \x00 \x07 chars",
    "a" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a cat. a dog. a bird.",
    LONG,
    "x " * 76,  # exactly 76 tokens: one over the limit
    "x " * 75,  # exactly 75 tokens: fits
]


def random_prompt(rng: random.Random) -> str:
    """A fresh prompt mixing scripts, digits, punctuation, emoji and odd whitespace."""
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        ".,;:!?'\"()[]{}<>-_/\\|@#$%^&*+=~`",
        " \t\n\r\u00a0\u3000",
        "éèêëàâäôöûüçñßøåæœÉÀÇ\u0301\u0308",
        "東京猫犬花夜光の日本語한국어",
        "абвгдежзийклмнопрстуфхцчшщыэюя",
        "🐱🐶🦄🎨✨👩‍👧🇫🇷❤️",
    ]
    n = rng.randint(0, 120)
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


@pytest.fixture(scope="module")
def ref():
    return transformers.CLIPTokenizer.from_pretrained(str(BUNDLED_VOCAB))


@pytest.fixture(scope="module")
def ours():
    return CLIPTokenizer.from_folder(BUNDLED_VOCAB)


def ref_ids(ref, prompts) -> torch.Tensor:
    return ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def assert_same(ours_ids, ref_ids_, prompts):
    assert ours_ids.dtype == torch.long and ours_ids.shape == (len(prompts), 77)
    bad = [(p, a.tolist(), b.tolist()) for p, a, b in zip(prompts, ours_ids, ref_ids_) if not torch.equal(a, b)]
    assert not bad, f"{len(bad)} prompts differ, first: {bad[0]}"


def test_fixed_prompts_match_transformers(ours, ref):
    assert len(PROMPTS) >= 50
    prompts = PROMPTS + SPECIAL_PROMPTS
    assert_same(ours(prompts), ref_ids(ref, prompts), prompts)


def test_random_prompts_match_transformers(ours, ref):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    prompts = [random_prompt(rng) for _ in range(200)]
    try:
        assert_same(ours(prompts), ref_ids(ref, prompts), prompts)
    except AssertionError as e:
        raise AssertionError(f"seed={seed}: {e}") from None


def test_special_ids_read_from_files(ours, ref):
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert ours.max_length == ref.model_max_length == 77
    assert ours.vocab_size == len(ref)


def test_tokenizer_json_only_folder(tmp_path, ref):
    """A folder written by transformers 5 save_pretrained (tokenizer.json, no vocab/merges)."""
    ref.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    for f in ("vocab.json", "merges.txt"):
        (tmp_path / f).unlink(missing_ok=True)
    tok = CLIPTokenizer.from_folder(tmp_path)
    reloaded = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    rng = random.Random()
    prompts = PROMPTS + SPECIAL_PROMPTS + [random_prompt(rng) for _ in range(50)]
    assert_same(tok(prompts), ref_ids(reloaded, prompts), prompts)
    assert_same(tok(prompts), ref_ids(ref, prompts), prompts)


def _added(content: str, normalized: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


SD15_CONFIG = {  # the SD1.5 repo's tokenizer/tokenizer_config.json
    "add_prefix_space": False,
    "bos_token": {"__type": "AddedToken", **_added("<|startoftext|>", True)},
    "do_lower_case": True,
    "eos_token": {"__type": "AddedToken", **_added("<|endoftext|>", True)},
    "errors": "replace",
    "model_max_length": 77,
    "name_or_path": "openai/clip-vit-large-patch14",
    "pad_token": "<|endoftext|>",
    "special_tokens_map_file": "./special_tokens_map.json",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": {"__type": "AddedToken", **_added("<|endoftext|>", True)},
}
SD15_MAP = {  # and its special_tokens_map.json
    "bos_token": _added("<|startoftext|>", True),
    "eos_token": _added("<|endoftext|>", True),
    "pad_token": "<|endoftext|>",
    "unk_token": _added("<|endoftext|>", True),
}
SPECIAL_PROMPTS = [
    "a<|endoftext|>b",
    "HELLO<|STARTOFTEXT|>world <|Endoftext|>",
    "x  <|endoftext|>  y",
    "wow!!! hi! !!",
    "trailing <|startoftext|>",
]


@pytest.mark.parametrize(
    "config, special_map",
    [
        (SD15_CONFIG, SD15_MAP),
        # a pad token other than eos (SD2 uses "!") must come from the files, not be hard-coded
        (SD15_CONFIG, {**SD15_MAP, "pad_token": "!"}),
        ({"model_max_length": 77, "bos_token": SD15_CONFIG["bos_token"], "eos_token": SD15_CONFIG["eos_token"]}, None),
    ],
    ids=["sd15", "pad!", "config-only"],
)
def test_special_tokens_from_config_files(tmp_path, config, special_map):
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(BUNDLED_VOCAB / f, tmp_path / f)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_map))
    tok = CLIPTokenizer.from_folder(tmp_path)
    ref = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    rng = random.Random()
    prompts = PROMPTS + SPECIAL_PROMPTS + [random_prompt(rng) for _ in range(50)]
    assert_same(tok(prompts), ref_ids(ref, prompts), prompts)


def test_truncation_warns_with_the_start_and_size_of_the_dropped_text(ours, ref, caplog):
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        ours([LONG, "short prompt"])
    warnings = [r for r in caplog.records if r.name == "fastdiff" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    full = ref(LONG).input_ids  # untruncated: bos + tokens + eos
    dropped = ref.decode(full[76:-1])
    words, message = dropped.split(), warnings[0].getMessage()
    assert len(words) > 8 and dropped not in message  # the first words, not all of a long text
    assert repr(" ".join(words[:8]) + " ...") in message
    assert f"dropped {len(full) - 2 - 75} tokens ({len(dropped)} characters)" in message

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        ours(["x " * 75])
    assert not caplog.records


def test_missing_files_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)


def test_import_does_not_pull_transformers():
    code = "import sys, fastdiff.tokenizer; assert 'transformers' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

"""sdort.runtime.tokenizer.CLIPTokenizer against transformers' CLIPTokenizer on the shipped vocabulary."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

import sdort.export
from sdort.runtime.tokenizer import TRUNCATION_MESSAGE, CLIPTokenizer

SHIPPED = Path(sdort.export.__file__).resolve().parent / "presets" / "tokenizer"
LOGGER = "sdort.runtime.tokenizer"

HAND_PROMPTS = [
    "",
    " ",
    "a photo of a cat",
    "A Photo Of A CAT",
    "an astronaut riding a horse on mars, highly detailed, 8k, trending on artstation",
    "masterpiece, best quality, (ultra-detailed:1.2), [sharp focus], {cinematic lighting}",
    "portrait of a woman, by Greg Rutkowski and Alphonse Mucha",
    "don't stop, I'm here, you're late, we've won, they'll go, he'd say, it's fine",
    "DON'T SHOUT, IT'S LOUD",
    "rock 'n' roll",
    "o'clock ’curly quotes’ “double” «guillemets»",
    "  extra   spaces\tand\ttabs\nand\nnewlines  ",
    "\u00a0non-breaking\u2003em-space\u3000ideographic space",
    "numbers 1234567890 3.14159 1e-5 -42 +7 100% $5 #1 @home",
    "2023-12-31 23:59:59, 4K HDR, 16:9, f/1.8, 1/250s, ISO100",
    "café, naïve, résumé, Ångström, Æther, façade, jalapeño, crème brûlée",
    "e\u0301 (combining accent) vs é (precomposed)",
    "Ünïcödé ÜBER STRASSE straße",
    "日本の桜の写真、東京タワー",
    "中文提示词：一只可爱的猫",
    "한국어 고양이 사진",
    "Москва зимой, красная площадь",
    "Ελληνικά γράμματα ΑΒΓ",
    "עברית ועוד, العربية",
    "हिन्दी चित्र",
    "ภาษาไทย",
    "emoji 🐱🔥🎨✨ 👩‍🚀 🇫🇷 ❤️",
    "🙂🙂🙂",
    "ﬁ ligature, ½ fraction, ① circled, ² superscript, Ⅻ roman",
    "wow!!! really??? ... -- ---- ___ ***",
    "x!y !a! !!",
    "!",
    "!!!!!!!!!!!!!!!!!!!!",
    "a,b;c.d!e?f:g/h\\i|j",
    "<|startoftext|> inside <|endoftext|> the prompt",
    "<|ENDOFTEXT|> upper special",
    "x<|endoftext|>y",
    "html &amp; entities &lt;b&gt;",
    "url https://example.com/path?q=1&r=2#frag",
    "email someone@example.org",
    "C++ and C# and F#",
    "snake_case_words and camelCaseWords and kebab-case-words",
    "1girl, solo, long hair, looking at viewer",
    "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "tab\tseparated\tvalues",
    "\x00control\x07chars\x1b",
    "zero\u200bwidth\u200djoiner",
    "mixed 123abc abc123 a1b2c3",
    "tailing punctuation.",
    "'quoted' \"double\" `back`",
    "(((((nested)))))",
    "a" * 300,
    "a photo of a cat " * 20,
    ", ".join(f"tag{i}" for i in range(60)),
    " ".join(["lorem ipsum dolor sit amet"] * 12),
    "🐱" * 40,
    "日本" * 50,
]


def _random_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = [
        "cat", "dog", "Forest", "CASTLE", "neon", "city", "sunset", "don't", "it's", "4k", "8K", "1990s",
        "hyper-realistic", "oil painting", "café", "naïve", "東京", "猫", "🌸", "🚀", "Ω", "ß", "ø", "!", "?", "...",
        ",", ";", "(", ")", "[", "]", "{", "}", "&", "%", "#", "@", "12", "3.5", "'s", "'LL", "x2", "__", "--",
    ]
    seps = [" ", "  ", ", ", ",", "\t", "\n", "", " - "]
    prompts = []
    for i in range(n):
        k = rng.choice([1, 3, 8, 20, 60]) if i % 7 else rng.randint(80, 140)
        text = "".join(rng.choice(words) + rng.choice(seps) for _ in range(k))
        prompts.append(text if i % 5 else text.upper())
    return prompts


PROMPTS = HAND_PROMPTS + _random_prompts(80)


# ---------------------------------------------------------------- folders


def _copy_folder(dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(SHIPPED / f, dst / f)
    return dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    out = {"sd15": SHIPPED}

    # SD 2.x / SDXL tokenizer_2 style: pads with "!" (id 0)
    sd2 = _copy_folder(root / "sd2")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = json.loads((sd2 / name).read_text())
        cfg["pad_token"] = "!"
        (sd2 / name).write_text(json.dumps(cfg))
    out["sd2"] = sd2

    # a config re-saved by recent transformers: added_tokens_decoder, no special_tokens_map.json
    resaved = _copy_folder(root / "resaved")
    (resaved / "special_tokens_map.json").unlink()

    def at(content, normalized):
        return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
                "single_word": False, "special": True}

    (resaved / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {"49406": at("<|startoftext|>", True), "49407": at("<|endoftext|>", False)},
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "!", "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer",
    }))
    out["resaved"] = resaved
    return out


@pytest.fixture(scope="module")
def hf_tokenizers(folders):
    transformers = pytest.importorskip("transformers")
    return {name: transformers.CLIPTokenizer.from_pretrained(str(path)) for name, path in folders.items()}


@pytest.fixture(scope="module")
def ours(folders):
    return {name: CLIPTokenizer.from_pretrained(path) for name, path in folders.items()}


def _hf_call(hf, prompts, max_length=None):
    """As diffusers' encode_prompt calls the tokenizer."""
    max_length = max_length or hf.model_max_length
    return np.asarray(
        hf(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np").input_ids
    )


# ---------------------------------------------------------------- vocabulary


def test_shipped_vocab():
    vocab = json.loads((SHIPPED / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert sorted(vocab.values()) == list(range(49408))
    assert vocab["<|startoftext|>"] == 49406
    assert vocab["<|endoftext|>"] == 49407
    assert vocab["a</w>"] == 320
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["photo</w>"] == 1125 and vocab["cat</w>"] == 2368
    assert vocab["in"] == 512  # first merge "i n"
    lines = (SHIPPED / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert len(lines) == 1 + 48894
    assert lines[1] == "i n" and lines[2] == "t h"
    # every merge produces the vocab entry at 512 + its rank
    assert all(vocab["".join(m.split(" "))] == 512 + i for i, m in enumerate(lines[1:]))
    cfg = json.loads((SHIPPED / "tokenizer_config.json").read_text())
    assert cfg["model_max_length"] == 77 and cfg["do_lower_case"] is True and cfg["tokenizer_class"] == "CLIPTokenizer"
    stm = json.loads((SHIPPED / "special_tokens_map.json").read_text())
    assert stm["pad_token"] == "<|endoftext|>" and stm["bos_token"]["content"] == "<|startoftext|>"
    assert (SHIPPED / "NOTICE").read_text().count("OpenAI") >= 1


def test_attributes(ours):
    sd15, sd2 = ours["sd15"], ours["sd2"]
    assert (sd15.bos_token_id, sd15.eos_token_id, sd15.pad_token_id) == (49406, 49407, 49407)
    assert sd15.model_max_length == 77 and sd15.vocab_size == 49408 and len(sd15) == 49408
    assert (sd2.pad_token, sd2.pad_token_id) == ("!", 0)
    ids = sd15("a photo of a cat")
    assert ids.dtype == np.int64 and ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()
    assert (sd2("a photo of a cat")[0, 7:] == 0).all()
    assert sd15([]).shape == (0, 77)
    assert sd15(["a", "b"], max_length=10).shape == (2, 10)
    assert sd15.decode(ids[0, :7]) == "<|startoftext|>a photo of a cat <|endoftext|>"
    assert sd15.decode(ids[0], skip_special_tokens=True) == "a photo of a cat"


def test_vocab_builder_matches_shipped(tmp_path):
    """export/vocab.py writes the shipped files from the merges (round trip through a reconstructed source text)."""
    from sdort.export import vocab as vocab_mod

    merges = (SHIPPED / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    text = "\n".join(['"bpe_simple_vocab_16e6.txt#version: 0.2', *merges, "unused merge", ""])
    vocab_mod.write_tokenizer_folder(tmp_path, text)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "NOTICE"):
        assert (tmp_path / name).read_bytes() == (SHIPPED / name).read_bytes(), name
    assert list(vocab_mod.bytes_to_unicode().values())[:3] == ["!", '"', "#"]


# ---------------------------------------------------------------- parity with transformers


def test_prompt_count():
    assert len(PROMPTS) >= 100


@pytest.mark.parametrize("name", ["sd15", "sd2", "resaved"])
def test_parity_batch(name, hf_tokenizers, ours):
    hf, tok = hf_tokenizers[name], ours[name]
    assert tok.model_max_length == hf.model_max_length == 77
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id)
    expected = _hf_call(hf, PROMPTS)
    got = tok(PROMPTS, warn=False)
    assert got.dtype == np.int64 and got.shape == expected.shape == (len(PROMPTS), 77)
    bad = [p for p, a, b in zip(PROMPTS, expected, got) if not np.array_equal(a, b)]
    assert not bad, bad[:5]
    # untruncated ids, as diffusers' padding="longest" call sees them
    untrunc = hf(PROMPTS).input_ids
    assert tok.encode_untruncated(PROMPTS) == untrunc
    # the backend pipeline is the same as transformers'
    ja, jb = json.loads(hf.backend_tokenizer.to_str()), json.loads(tok.backend.to_str())
    for key in ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert ja[key] == jb[key], key


@pytest.mark.parametrize("name", ["sd15", "sd2"])
def test_parity_single_and_small_batches(name, hf_tokenizers, ours):
    hf, tok = hf_tokenizers[name], ours[name]
    for p in PROMPTS[:40]:
        np.testing.assert_array_equal(tok(p, warn=False), _hf_call(hf, p).reshape(1, -1))
    for i in range(0, 30, 3):
        batch = PROMPTS[i : i + 3]
        np.testing.assert_array_equal(tok(tuple(batch), warn=False), _hf_call(hf, batch))
    for max_length in (8, 20):
        np.testing.assert_array_equal(tok(PROMPTS, max_length=max_length, warn=False), _hf_call(hf, PROMPTS, max_length))


@pytest.mark.parametrize("name", ["sd15", "sd2"])
def test_parity_decode(name, hf_tokenizers, ours):
    hf, tok = hf_tokenizers[name], ours[name]
    padded = np.asarray(hf(PROMPTS, padding="longest").input_ids)
    assert tok.batch_decode(padded) == hf.batch_decode(padded)
    assert tok.batch_decode(padded, skip_special_tokens=True) == hf.batch_decode(padded, skip_special_tokens=True)
    assert tok.decode(padded[3]) == hf.decode(padded[3].tolist())
    assert tok.tokenize(PROMPTS[7]) == hf.tokenize(PROMPTS[7])


def test_sd2_bang_is_an_added_token(hf_tokenizers, ours):
    """With "!" as pad token (SD2), transformers splits every "!" off as a special token; so do we."""
    a = ours["sd15"]("wow!!!", warn=False)[0]
    b = ours["sd2"]("wow!!!", warn=False)[0]
    assert a[:4].tolist() == [49406, 2781, 995, 49407]
    assert b[:6].tolist() == [49406, 2781, 0, 0, 0, 49407]
    np.testing.assert_array_equal(b, _hf_call(hf_tokenizers["sd2"], "wow!!!")[0])


def test_folder_saved_by_transformers(hf_tokenizers, tmp_path):
    """transformers 5 saves tokenizer.json + tokenizer_config.json only; that folder loads too."""
    hf = hf_tokenizers["sd2"]
    hf.save_pretrained(str(tmp_path))
    assert not (tmp_path / "vocab.json").exists()
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    np.testing.assert_array_equal(tok(PROMPTS, warn=False), _hf_call(hf, PROMPTS))
    assert tok.pad_token_id == 0


# ---------------------------------------------------------------- truncation warning


def _diffusers_message(hf, prompts):
    untrunc = np.asarray(hf(prompts, padding="longest").input_ids)
    removed = hf.batch_decode(untrunc[:, hf.model_max_length - 1 : -1])
    return (
        "The following part of your input was truncated because CLIP can only handle sequences up to"
        f" {hf.model_max_length} tokens: {removed}"
    )


@pytest.mark.parametrize("name", ["sd15", "sd2"])
def test_truncation_warning(name, hf_tokenizers, ours, caplog):
    hf, tok = hf_tokenizers[name], ours[name]
    long_prompt = " ".join(f"word{i}" for i in range(60)) + " the end of a very long prompt!"
    for prompts in ([long_prompt], [long_prompt, "short"], ["short", long_prompt, "a" * 200]):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            ids = tok(prompts)
        records = [r for r in caplog.records if r.name == LOGGER]
        assert len(records) == 1
        assert records[0].getMessage() == _diffusers_message(hf, prompts)
        assert tok.truncated_text(prompts) is not None
        np.testing.assert_array_equal(ids, _hf_call(hf, prompts))
    assert "the end of a very long prompt" in TRUNCATION_MESSAGE.format(
        max_length=77, removed=tok.truncated_text([long_prompt])
    )


def test_no_warning_when_not_truncated(ours, caplog):
    tok = ours["sd15"]
    exactly_77 = " ".join(["cat"] * 75)  # bos + 75 + eos = 77 tokens
    assert len(tok.encode_untruncated(exactly_77)[0]) == 77
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tok([exactly_77, "a cat", ""])
        tok("x " * 200, warn=False)
    assert not [r for r in caplog.records if r.name == LOGGER]
    assert tok.truncated_text([exactly_77]) is None


# ---------------------------------------------------------------- loading errors


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer folder"):
        CLIPTokenizer.from_pretrained(tmp_path / "nope")
    folder = _copy_folder(tmp_path / "t")
    (folder / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        CLIPTokenizer.from_pretrained(folder)
    (folder / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_pretrained(folder)


def test_subfolder_and_defaults(tmp_path):
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(SHIPPED / f, folder / f)
    tok = CLIPTokenizer.from_pretrained(tmp_path, subfolder="tokenizer")  # no config files: CLIP defaults
    assert (tok.pad_token_id, tok.model_max_length) == (49407, 77)
    with pytest.raises(TypeError):
        tok(123)

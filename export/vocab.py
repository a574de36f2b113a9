"""Build the CLIP ViT-L/14 tokenizer folder shipped in ``presets/tokenizer/``.

The vocabulary is derived from OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz``
(MIT License, Copyright (c) 2021 OpenAI), exactly as OpenAI's
``SimpleTokenizer`` (and open_clip's copy of it) derives it at run time, which is
also what ``openai/clip-vit-large-patch14`` ships on the Hugging Face Hub:

* the merge list is lines ``1 .. 48894`` of the file (line 0 is a version
  header; ``49152 - 256 - 2`` merges are used, the rest of the file is unused);
* the vocabulary is the 256 ``bytes_to_unicode`` characters, the same 256
  characters followed by ``</w>``, the 48894 merges joined, then
  ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49408 entries;
* ``merges.txt`` is a ``#version: 0.2`` header line followed by the 48894
  merges, one per line.

The source file is carried by the ``open_clip_torch`` wheel (``open_clip/``)
and by OpenAI's ``clip`` package. Usage::

    pip download --no-deps open_clip_torch -d /tmp/oc
    python -m sdort.export.vocab /tmp/oc/open_clip_torch-*.whl

The argument may be the wheel, the ``.txt.gz`` file or the uncompressed text;
without one, an installed ``open_clip`` or ``clip`` package is looked up.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# sha256 of the *uncompressed* bpe_simple_vocab_16e6.txt (gzip bytes may differ between copies).
BPE_TEXT_SHA256 = "67603cfda2e032ad77b5f8808af37789d590db664b26df8705d2bf8b3c553fc8"

NUM_MERGES = 49152 - 256 - 2  # 48894, as in CLIP's SimpleTokenizer
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 256 * 2 + NUM_MERGES + 2  # 49408
MODEL_MAX_LENGTH = 77

DEFAULT_OUT = Path(__file__).resolve().parent / "presets" / "tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible byte -> printable unicode character table (256 entries, in CLIP's order)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    # order: the printable bytes first, then the remapped ones (this order fixes the ids 0..255)
    ordered = {b: table[b] for b in printable}
    ordered.update({b: table[b] for b in range(256) if b not in ordered})
    return ordered


def read_bpe_text(source: str | Path | None = None) -> str:
    """Return the uncompressed text of bpe_simple_vocab_16e6.txt from a wheel, a .gz, a .txt or an installed package."""
    if source is None:
        source = _find_installed()
    source = Path(source)
    data = source.read_bytes()
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = [n for n in zf.namelist() if n.endswith("/" + BPE_FILE_NAME) or n == BPE_FILE_NAME]
            if not names:
                raise FileNotFoundError(f"{BPE_FILE_NAME} not found inside {source}")
            data = zf.read(sorted(names, key=len)[0])
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode("utf-8")


def _find_installed() -> Path:
    import importlib.util

    for pkg in ("open_clip", "clip"):
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                cand = Path(loc) / BPE_FILE_NAME
                if cand.is_file():
                    return cand
    raise FileNotFoundError(
        f"{BPE_FILE_NAME} not found; pass the open_clip_torch wheel or the file itself "
        "(pip download --no-deps open_clip_torch -d /tmp/oc)"
    )


def build_vocab_and_merges(bpe_text: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Derive (vocab, merges) from the text of bpe_simple_vocab_16e6.txt, as CLIP's SimpleTokenizer does."""
    lines = bpe_text.split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError("unexpected merges file: expected 48894 pairs after the header line")
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"vocabulary has {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def _added_token(content: str) -> dict:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def tokenizer_config(pad_token: str = EOS_TOKEN) -> dict:
    """tokenizer_config.json as Stable Diffusion 1.5's ``tokenizer/`` folder has it."""
    return {
        "add_prefix_space": False,
        "bos_token": _added_token(BOS_TOKEN),
        "do_lower_case": True,
        "eos_token": _added_token(EOS_TOKEN),
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": pad_token,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _added_token(EOS_TOKEN),
    }


def special_tokens_map(pad_token: str = EOS_TOKEN) -> dict:
    """special_tokens_map.json as Stable Diffusion 1.5's ``tokenizer/`` folder has it."""

    def tok(content):
        d = _added_token(content)
        d.pop("__type")
        return d

    return {"bos_token": tok(BOS_TOKEN), "eos_token": tok(EOS_TOKEN), "pad_token": pad_token, "unk_token": tok(EOS_TOKEN)}


NOTICE = """\
The files vocab.json and merges.txt in this folder are derived from
bpe_simple_vocab_16e6.txt.gz of OpenAI CLIP (https://github.com/openai/CLIP),
as redistributed in the open_clip_torch package. Derivation: sdort/export/vocab.py.

MIT License

Copyright (c) 2021 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def _dump_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_folder(out_dir: str | Path, bpe_text: str, pad_token: str = EOS_TOKEN) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json and NOTICE to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(bpe_text)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(out_dir / "merges.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    _dump_json(tokenizer_config(pad_token), out_dir / "tokenizer_config.json")
    _dump_json(special_tokens_map(pad_token), out_dir / "special_tokens_map.json")
    (out_dir / "NOTICE").write_text(NOTICE, encoding="utf-8")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", help="open_clip_torch wheel, bpe_simple_vocab_16e6.txt.gz or .txt")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: the package preset)")
    parser.add_argument("--pad-token", default=EOS_TOKEN, help='pad token (SD1.x: "<|endoftext|>", SD2.x: "!")')
    args = parser.parse_args(argv)

    text = read_bpe_text(args.source)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest != BPE_TEXT_SHA256:
        print(f"warning: {BPE_FILE_NAME} sha256 {digest} differs from the known OpenAI file", file=sys.stderr)
    out = write_tokenizer_folder(args.out, text, args.pad_token)
    print(f"wrote {out} ({VOCAB_SIZE} tokens, {NUM_MERGES} merges)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Textual inversion against diffusers' `load_textual_inversion` (+ its `maybe_convert_prompt`).

Claim: with the same embedding files, the token ids sdort's tokenizer makes equal transformers' after
diffusers has added the tokens, and the images equal diffusers' within 1e-3 max abs on [0, 1] (fp32),
for single- and multi-vector embeddings in diffusers' format ({token: vector}) and A1111's
(`emb_params`), on SD 1.x and on both SDXL text encoders. The new rows reach the text encoder as a
longer token-embedding initializer, which ONNX Runtime takes (its Gather reads the table's shape).
"""

from __future__ import annotations

import numpy as np
import pytest

from test_lora import _diffusers_pipe, _sdort_pipe, close, latents_for

PROMPT = "a photo of <cat> and <dog> next to <owl> on <bee>"


def _save(path, tensors):
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, path)
    return path


def _images(pipe, torch_pipe, prompt):
    latents = latents_for((1, 4, 4, 4))
    if torch_pipe:
        import torch

        latents = torch.from_numpy(latents)
    return pipe(prompt=prompt, num_inference_steps=2, height=32, width=32, latents=latents, output_type="np").images


def test_sd1_single_and_multi_vector_both_formats(sd1, tmp_path):
    _, folder = sd1
    rng = np.random.default_rng(0)
    files = [  # (file, token passed): diffusers' format names its token, A1111's is given one
        (_save(tmp_path / "cat.safetensors", {"<cat>": rng.standard_normal(32, dtype=np.float32)}), None),
        (_save(tmp_path / "dog.safetensors", {"<dog>": rng.standard_normal((3, 32), dtype=np.float32)}), None),
        (_save(tmp_path / "owl.safetensors", {"emb_params": rng.standard_normal((1, 32), dtype=np.float32)}), "<owl>"),
        (_save(tmp_path / "bee.safetensors", {"emb_params": rng.standard_normal((2, 32), dtype=np.float32)}), "<bee>"),
    ]
    reference, ours = _diffusers_pipe(folder), _sdort_pipe(folder)
    base = _images(ours, False, PROMPT)
    for file, token in files:
        reference.load_textual_inversion(str(file), token=token)
        ours.load_textual_inversion(file, token=token)
    expanded = reference.maybe_convert_prompt(PROMPT, reference.tokenizer)
    assert ours.tokenizer.maybe_convert_prompt(PROMPT) == expanded
    assert "<dog> <dog>_1 <dog>_2" in expanded
    ids = reference.tokenizer(expanded, padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(ours.tokenizer(expanded)[0], ids)
    close(_images(ours, False, PROMPT), _images(reference, True, PROMPT), base)

    with pytest.raises(ValueError, match="Token <cat> already in tokenizer vocabulary"):
        ours.load_textual_inversion(files[0][0])
    wide = _save(tmp_path / "wide.safetensors", {"<wide>": np.zeros(64, np.float32)})
    with pytest.raises(ValueError, match="wide.safetensors: embedding width 64.*32 wide"):
        ours.load_textual_inversion(wide)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        ours.load_textual_inversion(tmp_path / "nope.safetensors")


def test_sdxl_both_text_encoders(sdxl, tmp_path):
    _, folder = sdxl
    rng = np.random.default_rng(1)
    clip_l, clip_g = rng.standard_normal((2, 32), dtype=np.float32), rng.standard_normal((2, 64), dtype=np.float32)
    file = _save(tmp_path / "sdxl_emb.safetensors", {"clip_l": clip_l, "clip_g": clip_g})
    reference, ours = _diffusers_pipe(folder, xl=True), _sdort_pipe(folder, xl=True)
    prompt = "a painting of <tok> in a field"
    base = _images(ours, False, prompt)
    # diffusers' documented way: one call per encoder
    reference.load_textual_inversion({"<tok>": __import__("torch").from_numpy(clip_l)}, token="<tok>",
                                     text_encoder=reference.text_encoder, tokenizer=reference.tokenizer)
    reference.load_textual_inversion({"<tok>": __import__("torch").from_numpy(clip_g)}, token="<tok>",
                                     text_encoder=reference.text_encoder_2, tokenizer=reference.tokenizer_2)
    ours.load_textual_inversion(file, token="<tok>")  # both encoders from the one file
    close(_images(ours, False, prompt), _images(reference, True, prompt), base)


def test_cli_embedding(sd1, tmp_path):
    """`--embedding FILE:TOKEN` (A1111's format, token given) and `--embedding FILE` (diffusers' format,
    the file's token) give the image of load_textual_inversion with the same prompt and seed."""
    from PIL import Image

    from sdort.runtime import cli
    from sdort.runtime.randomness import TorchGenerator

    _, folder = sd1
    rng = np.random.default_rng(3)
    owl = _save(tmp_path / "owl.safetensors", {"emb_params": rng.standard_normal((2, 32), dtype=np.float32)})
    cat = _save(tmp_path / "cat.safetensors", {"<cat>": rng.standard_normal(32, dtype=np.float32)})
    prompt, out = "a <owl> and a <cat>", tmp_path / "ti.png"
    assert cli.main(["txt2img", "--model", str(folder), prompt, "--steps", "2", "--height", "32", "--width", "32",
                     "--seed", "9", "--embedding", f"{owl}:<owl>", "--embedding", str(cat), "-o", str(out)]) == 0
    ours = _sdort_pipe(folder)
    ours.load_textual_inversion(owl, token="<owl>")
    ours.load_textual_inversion(cat)
    expected = ours(prompt, num_inference_steps=2, height=32, width=32, generator=TorchGenerator(9)).images[0]
    with Image.open(out) as written:
        assert np.array_equal(np.asarray(written), np.asarray(expected))

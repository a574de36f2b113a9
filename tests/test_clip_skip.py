"""`clip_skip` for SD 1.x/2.x, as diffusers applies it (SDXL's is in test_sdxl.py).

Claim: the prompt's embeddings are the hidden state `clip_skip` layers before the last, through the
text encoder's final layer norm (whose weights sdort reads from the ONNX file); the negative
prompt's are the last hidden state; images equal diffusers' within 1e-3.
"""

from __future__ import annotations

import numpy as np
import pytest

TOLERANCE = 1e-3


def reference_with_text_model(reference):
    """diffusers 0.42 reads `text_encoder.text_model.final_layer_norm`; transformers 5's CLIPTextModel
    is that text model itself. The alias (not a registered submodule) lets diffusers' own code run."""
    object.__setattr__(reference.text_encoder, "text_model", reference.text_encoder)
    return reference


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_matches_diffusers(sd1, clip_skip):
    from sdort.runtime import StableDiffusionPipeline

    reference, folder = sd1
    reference = reference_with_text_model(reference)
    ours = StableDiffusionPipeline.from_pretrained(folder, provider="cpu")
    ours.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red fox in the snow", negative_prompt="blurry", num_inference_steps=3, height=64, width=64)
    import torch

    got = ours(generator=0, clip_skip=clip_skip, output_type="np", **kwargs).images
    expected = reference(generator=torch.Generator().manual_seed(0), clip_skip=clip_skip, output_type="np",
                         **kwargs).images
    assert got.std() > 1e-3
    assert np.abs(got - expected).max() <= TOLERANCE
    plain = ours(generator=0, output_type="np", **kwargs).images
    assert np.abs(got - plain).max() > 1e-3  # a different layer, a different image


def test_embeddings_are_the_layer_diffusers_takes(sd1):
    """The embeddings themselves, for clip_skip 0..5 (5 layers): the same as diffusers' encode_prompt."""
    from sdort.runtime import StableDiffusionPipeline

    reference, folder = sd1
    reference = reference_with_text_model(reference)
    ours = StableDiffusionPipeline.from_pretrained(folder, provider="cpu")
    for clip_skip in range(6):  # 5: the token embeddings themselves
        got, _ = ours.encode_prompt("a castle on a hill", 1, False, clip_skip=clip_skip)
        expected, _ = reference.encode_prompt("a castle on a hill", "cpu", 1, False, clip_skip=clip_skip)
        assert np.abs(got - expected.detach().numpy()).max() <= 1e-5
    with pytest.raises(ValueError, match="clip_skip: 6 skips more layers"):
        ours.encode_prompt("a castle", 1, False, clip_skip=6)
    with pytest.raises(ValueError, match="clip_skip must be an integer"):
        ours.encode_prompt("a castle", 1, False, clip_skip=-1)


def test_an_export_without_hidden_states_refuses_clip_skip(sd1, tmp_path):
    """An older export (or Optimum's SD 1 text encoder) has no hidden_states outputs: a clear error, not a
    wrong image; without clip_skip it works as before."""
    import shutil

    import onnx

    from sdort.runtime import StableDiffusionPipeline

    _, folder = sd1
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    model = onnx.load(str(old / "text_encoder" / "model.onnx"))
    kept = [o for o in model.graph.output if not o.name.startswith("hidden_states.")]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, str(old / "text_encoder" / "model.onnx"))
    ours = StableDiffusionPipeline.from_pretrained(old, provider="cpu")
    ours.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="clip_skip: this export's text_encoder has no hidden_states outputs"):
        ours("a fox", clip_skip=1, num_inference_steps=2, height=64, width=64)
    assert ours("a fox", num_inference_steps=2, height=64, width=64, output_type="np").images.shape == (1, 64, 64, 3)

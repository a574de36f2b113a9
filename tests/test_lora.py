"""Run-time and export-time LoRA against diffusers' `load_lora_weights` + `set_adapters` / `fuse_lora`.

Claim: with the same LoRA files, seeds and latents, sdort's images equal diffusers' within 1e-3 max abs
on [0, 1] (fp32). diffusers runs the LoRA unfused (W x + s B (A x)) where sdort merges it into the
weights ((W + s B A) x): the same sum in another order, float32 rounding apart, far below 1e-3 on
these tiny models. Restoring the base weights (unfuse, unload, set_adapters([])) is exact: sdort
gives the session the file's own weights again.

The LoRA files are made by peft / diffusers themselves (LoraConfig adapters on the tiny models, lora_B
randomised as training would leave it, `save_lora_weights` with its adapter metadata), and a kohya
file is written from the same tensors with kohya's key names and alphas.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import latents_for

TOLERANCE = 1e-3
PROMPT = "a red fox in the snow"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"]  # conv1: 3x3 LoRA convolutions
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


@pytest.fixture(scope="module", autouse=True)
def transformers_takes_this_peft():
    """transformers 5 asks for peft >= 0.22 before its `add_adapter` / `load_adapter` (which diffusers'
    text-encoder LoRA goes through); the newest peft on this project's index is 0.21.2, whose
    injection and state-dict functions those methods call work with it. The check alone is
    skipped; that the text encoder's base weights stay intact through it is itself checked
    (`test_runtime_lora_scales_adapters_fuse_unload`: weight 0 gives diffusers' base images)."""
    import transformers.integrations.peft as integration

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(integration, "check_peft_version", lambda min_version: None)
        yield


def _peft_layers(model, targets, seed, rank=4, alpha=8):
    """peft's LoRA state dict for `model` (a copy) with random A and B, and its LoraConfig as a dict."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model_state_dict
    from peft.tuners.lora import LoraModel  # noqa: F401  (peft's injection, as diffusers uses it)

    model = copy.deepcopy(model)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(seed)
    model.add_adapter(config)
    with torch.no_grad():  # small enough that the images stay in range, large enough to change them
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    layers = get_peft_model_state_dict(model)
    meta = config.to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    return layers, meta


def make_peft_lora(reference, folder: Path, seed: int, components=("unet", "text_encoder")) -> Path:
    """A diffusers-format LoRA file (pytorch_lora_weights.safetensors) for `components` of the pipeline."""
    args = {}
    for component in components:
        model = getattr(reference, component)
        targets = UNET_TARGETS if component == "unet" else TEXT_TARGETS
        layers, meta = _peft_layers(model, targets, seed + len(args))
        args[f"{component}_lora_layers"] = layers
        args[f"{component}_lora_adapter_metadata"] = meta
    type(reference).save_lora_weights(folder, **args)
    return folder / "pytorch_lora_weights.safetensors"


def make_kohya_lora(peft_file: Path, out: Path, alpha: float = 2.0) -> Path:
    """The same layers under kohya's names: `lora_unet_<module with _>.lora_down.weight`, `lora_te_…`,
    `lora_te1_…` / `lora_te2_…` for SDXL, and an `alpha` per layer (scale alpha / rank)."""
    import torch
    from safetensors.torch import load_file, save_file

    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
    tensors = load_file(peft_file)
    xl = any(key.startswith("text_encoder_2.") for key in tensors)
    if xl:
        prefixes["text_encoder"] = "lora_te1_"
    kohya = {}
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        module, _, role = rest.rpartition(".lora_")
        name = prefixes[component] + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if role.startswith('A') else 'up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(kohya, out)
    return out


def _diffusers_pipe(folder: Path, xl: bool = False):
    import diffusers

    cls = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
    extra = {} if xl else dict(safety_checker=None, requires_safety_checker=False)
    pipe = cls.from_pretrained(folder.parent / "diffusers", **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sdort_pipe(folder: Path, xl: bool = False):
    from sdort.runtime import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe = (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).from_pretrained(folder, provider="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, torch_pipe: bool, size: int = 32):
    latents = latents_for((1, 4, size // 8, size // 8))
    if torch_pipe:
        import torch

        latents = torch.from_numpy(latents)
    return pipe(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=2, height=size, width=size,
                latents=latents, output_type="np").images


def close(got, expected, base=None):
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOLERANCE
    if base is not None:  # the LoRA did change the picture: the comparison proves something
        assert np.abs(got - base).max() > 20 * TOLERANCE


@pytest.fixture(scope="module")
def sd1_lora(sd1, tmp_path_factory):
    """(diffusers pipe with two adapters loaded, sdort pipe, base images, files) on the tiny SD1 export."""
    _, folder = sd1
    tmp = tmp_path_factory.mktemp("lora")
    reference = _diffusers_pipe(folder)
    peft_file = make_peft_lora(reference, tmp / "a", seed=1)
    kohya_file = make_kohya_lora(make_peft_lora(reference, tmp / "b", seed=7), tmp / "b_kohya.safetensors")
    return folder, peft_file, kohya_file


def _toy_export(module, tmp_path, float16=False):
    """A small torch module (Linear layers become MatMul with transposed weights, a Conv) traced to ONNX
    as the exporter does, its parameter map computed on the saved file."""
    import torch

    from sdort.export import convert, parameter_map

    digests = parameter_map.digest_parameters(module, float16=float16)
    path = tmp_path / "toy.onnx"
    with torch.no_grad():
        torch.onnx.export(module.eval(), (torch.zeros(1, 4, 3, 3),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
    folder = tmp_path / "part"
    graph = __import__("onnx").load(str(path))
    convert.save(convert.to_float16(graph) if float16 else graph, folder)
    return parameter_map.write(digests, folder)


class _Toy(__import__("torch").nn.Module):
    def __init__(self, same=False):
        import torch

        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.a, self.b = torch.nn.Linear(6, 5), torch.nn.Linear(5, 5)
        if same:  # identical values in two parameters: which initializer is which cannot be told
            self.c = torch.nn.Linear(5, 5)
            with torch.no_grad():
                self.c.weight.copy_(self.b.weight)
        else:
            self.c = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.c(self.b(self.a(self.conv(x).permute(0, 2, 3, 1))))


@pytest.mark.parametrize("float16", [False, True])
def test_parameter_map_by_value(tmp_path, float16):
    from onnx import load, numpy_helper

    content = _toy_export(_Toy(), tmp_path, float16)
    assert sorted(content["parameters"]) == ["a.weight", "b.weight", "c.weight", "conv.weight"]
    assert not content["ambiguous"] and not content["missing"]
    stored = {t.name: numpy_helper.to_array(t) for t in load(str(tmp_path / "part" / "model.onnx")).graph.initializer}
    toy = _Toy()
    for name, places in content["parameters"].items():
        (place,) = places
        array = stored[place["initializer"]]
        assert place["dtype"] == ("float16" if float16 else "float32") == array.dtype.name
        value = dict(toy.named_parameters())[name].detach().numpy()
        np.testing.assert_array_equal(array.T if place["transposed"] else array, value.astype(array.dtype))
    assert content["parameters"]["a.weight"][0]["transposed"]  # a Linear as MatMul


def test_parameter_map_refuses_identical_parameters(tmp_path):
    content = _toy_export(_Toy(same=True), tmp_path)
    assert content["ambiguous"] == ["b.weight", "c.weight"]
    assert "b.weight" not in content["parameters"] and "a.weight" in content["parameters"]


def test_parameter_map_written(sd1):
    _, folder = sd1
    content = json.loads((folder / "unet" / "parameters.json").read_text())
    entry = content["parameters"]["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    assert entry[0]["transposed"] and entry[0]["dtype"] == "float32"
    assert not content["ambiguous"]
    text = json.loads((folder / "text_encoder" / "parameters.json").read_text())
    embedding = {**text["parameters"]}.get("embeddings.token_embedding.weight")  # transformers 5's name
    assert embedding[0]["shape"] == [49408, 32] and not embedding[0]["transposed"]


def test_runtime_lora_scales_adapters_fuse_unload(sd1_lora):
    folder, peft_file, kohya_file = sd1_lora
    reference, ours = _diffusers_pipe(folder), _sdort_pipe(folder)
    base = images(ours, False)
    close(base, images(reference, True))

    reference.load_lora_weights(peft_file, adapter_name="a")
    ours.load_lora_weights(peft_file, adapter_name="a")
    assert ours.get_active_adapters() == reference.get_active_adapters() == ["a"]
    reference.set_adapters(["a"], [0.0])
    assert np.array_equal(images(reference, True), images(reference_base := _diffusers_pipe(folder), True))
    del reference_base
    reference.set_adapters(["a"], [1.0])
    close(images(ours, False), images(reference, True), base)  # scale 1 (alpha / rank = 2 in the metadata)

    for scale in (0.5, {"unet": 1.5, "text_encoder": 0.25}):
        reference.set_adapters(["a"], [scale])
        ours.set_adapters(["a"], [scale])
        close(images(ours, False), images(reference, True), base)

    reference.load_lora_weights(kohya_file, adapter_name="b")
    ours.load_lora_weights(kohya_file, adapter_name="b")
    reference.set_adapters(["a", "b"], [0.7, 0.4])
    ours.set_adapters(["a", "b"], [0.7, 0.4])
    both = images(ours, False)
    close(both, images(reference, True), base)

    reference.fuse_lora(lora_scale=0.8)
    ours.fuse_lora(lora_scale=0.8)
    close(images(ours, False), images(reference, True), base)
    reference.unfuse_lora()
    ours.unfuse_lora()
    close(images(ours, False), images(reference, True), base)  # diffusers keeps lora_scale on the layers
    reference.set_adapters(["a", "b"], [0.7, 0.4])
    ours.set_adapters(["a", "b"], [0.7, 0.4])
    assert np.abs(images(ours, False) - both).max() <= TOLERANCE

    ours.unload_lora_weights()
    assert ours.get_active_adapters() == []
    assert np.array_equal(images(ours, False), base)  # the file's own weights again: exact

    # fuse, then unload: diffusers' way to keep a fused LoRA without its layers
    reference.unload_lora_weights()
    for pipe in (reference, ours):
        pipe.load_lora_weights(peft_file, adapter_name="a")
        pipe.fuse_lora(lora_scale=0.5)
        pipe.unload_lora_weights()
    close(images(ours, False), images(reference, True), base)


def test_switching_reloads_only_changed_parts(sd1_lora):
    folder, peft_file, _ = sd1_lora
    ours = _sdort_pipe(folder)
    sessions = {name: getattr(ours, name).session for name in ("unet", "text_encoder", "vae_decoder")}
    ours.load_lora_weights(peft_file, adapter_name="a")
    assert ours.vae_decoder.session is sessions["vae_decoder"]
    unet_session, text_session = ours.unet.session, ours.text_encoder.session
    ours.set_adapters("a", {"unet": 0.5})  # the text encoder's weight stays 1.0: its session stays
    assert ours.text_encoder.session is text_session and ours.unet.session is not unet_session
    unet_session = ours.unet.session
    ours.set_adapters("a", {"unet": 0.5})  # nothing changes
    assert ours.unet.session is unet_session


def test_export_time_fusing(sd1_lora, tmp_path):
    from sdort.export.cli import main

    folder, peft_file, kohya_file = sd1_lora
    out = tmp_path / "fused"
    assert main([str(folder.parent / "diffusers"), str(out), "--lora", f"{peft_file}:0.6", "--lora", str(kohya_file)]) == 0
    manifest = json.loads((out / "sdort.json").read_text())
    assert [entry["scale"] for entry in manifest["loras"]] == [0.6, 1.0]
    reference = _diffusers_pipe(folder)
    reference.load_lora_weights(peft_file, adapter_name="a")
    reference.load_lora_weights(kohya_file, adapter_name="b")
    reference.set_adapters(["a", "b"], [0.6, 1.0])
    reference.fuse_lora()
    expected = images(reference, True)
    got = images(_sdort_pipe(out), False)
    close(got, expected, images(_sdort_pipe(folder), False))


def test_errors(sd1_lora, tmp_path):
    from safetensors.numpy import save_file

    folder, peft_file, kohya_file = sd1_lora
    ours = _sdort_pipe(folder)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        ours.load_lora_weights(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_file({"lora_unet_no_such_block_to_q.lora_down.weight": np.zeros((4, 32), np.float32),
               "lora_unet_no_such_block_to_q.lora_up.weight": np.zeros((32, 4), np.float32)}, bad)
    with pytest.raises(ValueError, match=r"bad.safetensors: key 'lora_unet_no_such_block_to_q\.lora_down\.weight'"):
        ours.load_lora_weights(bad)
    # a LoRA for SDXL (text_encoder_2) on an SD 1.x model
    xl_file = tmp_path / "xl.safetensors"
    module = "text_encoder_2.encoder.layers.0.self_attn.q_proj"
    save_file({f"{module}.lora_A.weight": np.zeros((4, 64), np.float32),
               f"{module}.lora_B.weight": np.zeros((64, 4), np.float32)}, xl_file)
    with pytest.raises(ValueError, match="xl.safetensors: key .* text_encoder_2, which this model does not have"):
        ours.load_lora_weights(xl_file)
    assert ours.get_active_adapters() == []
    # an export without parameters.json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(folder, old)
    (old / "unet" / "parameters.json").unlink()
    with pytest.raises(FileNotFoundError, match="parameters.json: missing.*export the model again"):
        _sdort_pipe(old).load_lora_weights(peft_file)


def test_sdxl_unet_and_both_text_encoders(sdxl, tmp_path):
    _, folder = sdxl
    reference, ours = _diffusers_pipe(folder, xl=True), _sdort_pipe(folder, xl=True)
    peft_file = make_peft_lora(reference, tmp_path / "xl", seed=5, components=("unet", "text_encoder", "text_encoder_2"))
    kohya_file = make_kohya_lora(peft_file, tmp_path / "xl_kohya.safetensors", alpha=8.0)
    base = images(ours, False)
    for name, file in (("peft", peft_file), ("kohya", kohya_file)):
        reference.load_lora_weights(file, adapter_name=name)
        ours.load_lora_weights(file, adapter_name=name)
    reference.set_adapters(["peft", "kohya"], [0.5, 0.3])
    ours.set_adapters(["peft", "kohya"], [0.5, 0.3])
    close(images(ours, False), images(reference, True), base)
    ours.set_adapters([], [])
    assert np.array_equal(images(ours, False), base)


def test_cli_lora_recreates_each_changed_part_once(sd1_lora, tmp_path, monkeypatch):
    """`sdort txt2img --lora A:0.6 --lora B` gives the image of load_lora_weights + set_adapters, and
    re-creates the UNet's and the text encoder's sessions once each for both files (not once per call)."""
    from PIL import Image

    from sdort.runtime import cli
    from sdort.runtime.randomness import TorchGenerator
    from sdort.runtime.sessions import OnnxModel

    folder, peft_file, kohya_file = sd1_lora
    reloads, reload = [], OnnxModel.reload
    monkeypatch.setattr(OnnxModel, "reload", lambda self, found: (reloads.append(self.name), reload(self, found))[1])
    out = tmp_path / "lora.png"
    argv = ["txt2img", "--model", str(folder), PROMPT, "--steps", "2", "--height", "32", "--width", "32",
            "--seed", "5", "--lora", f"{peft_file}:0.6", "--lora", str(kohya_file), "-o", str(out)]
    assert cli.main(argv) == 0
    assert sorted(reloads) == ["text_encoder", "unet"]
    monkeypatch.setattr(OnnxModel, "reload", reload)

    ours = _sdort_pipe(folder)
    ours.load_lora_weights(peft_file, adapter_name="a")
    ours.load_lora_weights(kohya_file, adapter_name="b")
    ours.set_adapters(["a", "b"], [0.6, 1.0])
    expected = ours(PROMPT, num_inference_steps=2, height=32, width=32, generator=TorchGenerator(5)).images[0]
    with Image.open(out) as written:
        assert np.array_equal(np.asarray(written), np.asarray(expected))
        assert written.text["lora"] == f"{peft_file}:0.6, {kohya_file}:1"

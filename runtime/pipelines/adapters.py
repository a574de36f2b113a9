"""diffusers' LoRA and textual-inversion methods on sdort's pipelines, without torch.

`AdapterMixin` gives a pipeline diffusers' `load_lora_weights`, `set_adapters`, `get_active_adapters`,
`get_list_adapters`, `disable_lora` / `enable_lora`, `fuse_lora`, `unfuse_lora`, `unload_lora_weights`,
`delete_adapters` and `load_textual_inversion` (`StableDiffusionLoraLoaderMixin`,
`TextualInversionLoaderMixin`), with their meaning:

- the weights a part runs with are its exported weights + what is fused + for each active adapter
  not fused, weight * scale * up @ down (PEFT's unmerged forward, here merged into the weights:
  W x + s B A x = (W + s B A) x), computed in numpy (`lora.py`);
- the part's session is then re-created with those weights given to ONNX Runtime in place of the
  file's (`OnnxModel.reload`, `SessionOptions.add_initializer`), which holds them in memory as they
  are; only the parts whose weights change are re-created, and each base weight is read from the
  model file once;
- textual inversion adds tokens to the tokenizer and rows to the text encoder's token embedding (a
  longer table given the same way), and prompts are expanded as diffusers' `maybe_convert_prompt`.

Where the weights live: `<part>/parameters.json`, written by `sd-export`, names the initializer and
layout of every parameter (see export/parameter_map.py); an export without it must be made again.
"""

from __future__ import annotations

import contextlib
import numbers
from pathlib import Path

import numpy as np

from ..lora import COMPONENTS, ParameterMap, lora_delta, read_embedding, read_lora
from ..model_files import read_initializers

# The token embedding's parameter, as transformers 5 names it (and before it, below `text_model.`).
TOKEN_EMBEDDINGS = ("embeddings.token_embedding.weight", "text_model.embeddings.token_embedding.weight")


class _PartWeights:
    """One part's weights as the adapters make them: the parameter map, the base weights read once,
    and what the session was last given (so that an unchanged part is not re-created)."""

    def __init__(self, name: str, model):
        self.name = name
        self.model = model
        self.map = ParameterMap(Path(model.path).parent, name)
        self.base: dict[str, np.ndarray] = {}  # initializer -> array as stored
        self.applied = ()  # the signature of what the session holds; () = the file's weights
        # Fused adapters, by load key (see `AdapterMixin._adapters`): (layers, weight). `kept`: fused
        # ones whose adapters were unloaded, which unfuse_lora no longer takes out (as diffusers).
        self.fused: dict[str, tuple] = {}
        self.kept: dict[str, tuple] = {}
        self.extra_rows = None  # textual inversion: rows appended to the token embedding
        self.token_embedding = next((n for n in TOKEN_EMBEDDINGS if n in self.map.parameters), TOKEN_EMBEDDINGS[0])

    def read_base(self, initializers) -> None:
        missing = [n for n in initializers if n not in self.base]
        if missing:
            self.base.update(read_initializers(self.model.path, missing))

    def apply(self, deltas: dict[str, np.ndarray], signature) -> bool:
        """Give the session base + `deltas` (param -> float32 delta) and the extra embedding rows;
        False where it already has them."""
        if signature == self.applied:
            return False
        if not signature:  # the file's own weights
            self.model.reload(None)
            self.applied = ()
            return True
        overrides = {}
        params = set(deltas) | ({self.token_embedding} if self.extra_rows is not None else set())
        places = {p: self.map.locations(p) for p in params}
        self.read_base([place["initializer"] for found in places.values() for place in found])
        for param, found in places.items():
            for place in found:
                base = self.base[place["initializer"]]
                weight = base
                if param in deltas:
                    delta = deltas[param].T if place["transposed"] else deltas[param]
                    weight = (base.astype(np.float32) + delta).astype(base.dtype)
                if param == self.token_embedding and self.extra_rows is not None:
                    weight = np.concatenate([weight, self.extra_rows.astype(base.dtype)])
                overrides[place["initializer"]] = np.ascontiguousarray(weight)
        self.model.reload(overrides)
        self.applied = signature
        return True


class AdapterMixin:
    """diffusers' LoRA / textual-inversion loader methods for a pipeline with `unet` and text encoder(s)."""

    # ---- state --------------------------------------------------------------------------------

    def _adapters(self) -> dict:
        state = self.__dict__.get("_adapter_state")
        if state is None:
            state = self.__dict__["_adapter_state"] = {
                "loras": {},  # adapter -> component -> param -> LoraLayer
                "keys": {},  # adapter -> a key unique to this load of it
                "loaded": 0,
                "weights": {},  # adapter -> component -> weight (set_adapters)
                "active": [],
                "enabled": True,
                "merged": set(),  # (adapter, component) fused into the weights
                "parts": {},  # component -> _PartWeights
                "held": None,  # inside adapter_changes(): the components whose refresh waits
            }
        return state

    @contextlib.contextmanager
    def adapter_changes(self):
        """Hold the re-creation of sessions until the block ends, so that loading several LoRAs and
        setting their weights re-creates each changed part once (sdort's; diffusers has no sessions)."""
        state = self._adapters()
        if state["held"] is not None:  # nested: the outer block refreshes
            yield
            return
        state["held"] = set()
        try:
            yield
        finally:
            held, state["held"] = state["held"], None
            if held:
                self._refresh(sorted(held))

    def _part_weights(self, component: str) -> _PartWeights | None:
        parts = self._adapters()["parts"]
        model = getattr(self, component, None)
        if model is None:
            return None
        if component not in parts or parts[component].model is not model:
            parts[component] = _PartWeights(component, model)
        return parts[component]

    def _present_components(self) -> list[str]:
        return [c for c in COMPONENTS if getattr(self, c, None) is not None]

    def _refresh(self, components=None) -> None:
        """Re-create the sessions of `components` (default: every part an adapter touched) whose
        effective weights changed."""
        state = self._adapters()
        if state["held"] is not None:
            state["held"].update(components or list(state["parts"]))
            return
        for component in components or list(state["parts"]):
            part = self._part_weights(component)
            if part is None:
                continue
            # The weights are base + sum of weight * LoRA over these terms, by load key: what is fused
            # or kept and the active, unfused adapters. Equal sums give equal weights, so fusing at
            # lora_scale 1 or unfusing into the same active adapters re-creates nothing.
            terms: dict[str, list] = {}
            for key, (layers, weight) in [*part.kept.items(), *part.fused.items()]:
                terms.setdefault(key, [layers, 0.0])[1] += weight
            if state["enabled"]:
                for name in state["active"]:
                    layers = state["loras"][name].get(component)
                    if layers and (name, component) not in state["merged"]:
                        terms.setdefault(state["keys"][name], [layers, 0.0])[1] += state["weights"][name].get(component, 1.0)
            terms = {key: term for key, term in terms.items() if term[1] != 0}
            rows = 0 if part.extra_rows is None else len(part.extra_rows)
            signature = (tuple(sorted((key, weight) for key, (_, weight) in terms.items())), rows) \
                if (terms or rows) else ()
            if signature == part.applied:
                continue
            deltas = {}
            for layers, weight in terms.values():
                self._add_deltas(deltas, part, layers, weight)
            part.apply(deltas, signature)

    @staticmethod
    def _add_deltas(deltas: dict, part: _PartWeights, layers: dict, weight: float) -> None:
        for param, layer in layers.items():
            place = part.map.locations(param)[0]
            shape = place["shape"][::-1] if place["transposed"] else place["shape"]
            delta = lora_delta(layer, shape) * np.float32(weight * layer.scale)
            deltas[param] = deltas[param] + delta if param in deltas else delta

    # ---- LoRA ---------------------------------------------------------------------------------

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None, **kwargs):
        """diffusers' `load_lora_weights`: read a LoRA .safetensors file (diffusers / PEFT or kohya) for
        the UNet and text encoder(s) as adapter `adapter_name` (default `default_<n>`, n the adapters
        loaded so far) and make it active (with weight 1) beside the active ones."""
        if not isinstance(pretrained_model_name_or_path_or_dict, (str, Path)):
            raise ValueError("load_lora_weights: give the path of a .safetensors file (or of a folder holding "
                             "pytorch_lora_weights.safetensors); sdort does not take state dicts of torch tensors")
        if kwargs.get("weight_name"):
            pretrained_model_name_or_path_or_dict = Path(pretrained_model_name_or_path_or_dict) / kwargs["weight_name"]
        path = Path(pretrained_model_name_or_path_or_dict)
        if path.is_dir():
            path = path / "pytorch_lora_weights.safetensors"
        state = self._adapters()
        name = adapter_name or f"default_{len(state['loras'])}"
        if name in state["loras"]:
            raise ValueError(f"adapter_name: an adapter named '{name}' is already loaded; "
                             f"choose another name or call delete_adapters('{name}') first")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such LoRA file")
        known = {c: self._part_weights(c).map.names() for c in self._present_components()}
        layers = read_lora(path, known)
        for component, found in layers.items():  # every layer the file names is mapped: check now
            part = self._part_weights(component)
            for param in found:
                part.map.locations(param)
        state["loras"][name] = layers
        state["loaded"] += 1
        state["keys"][name] = f"{name}#{state['loaded']}"
        state["weights"][name] = {c: 1.0 for c in layers}
        state["active"] = [*state["active"], name]
        self._refresh(list(layers))

    def get_list_adapters(self) -> dict[str, list[str]]:
        """diffusers' `get_list_adapters`: the adapters loaded into each component."""
        state = self._adapters()
        listed = {}
        for name, layers in state["loras"].items():
            for component in layers:
                listed.setdefault(component, []).append(name)
        return listed

    def get_active_adapters(self) -> list[str]:
        """diffusers' `get_active_adapters`: the adapters in use."""
        return list(self._adapters()["active"])

    def set_adapters(self, adapter_names, adapter_weights=None):
        """diffusers' `set_adapters`: use only `adapter_names`, each with its weight (one number for
        all; a list, one per name; an entry may be a dict by component, e.g. {"unet": 0.5,
        "text_encoder": 1.0}, components not named getting 1.0; None: 1.0 each)."""
        state = self._adapters()
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in state["loras"]]
        if unknown:
            raise ValueError(f"adapter_names: {unknown} not loaded; loaded: {list(state['loras'])}")
        if adapter_weights is None or isinstance(adapter_weights, (numbers.Number, dict)):
            adapter_weights = [1.0 if adapter_weights is None else adapter_weights] * len(names)
        adapter_weights = list(adapter_weights)
        if len(adapter_weights) != len(names):
            raise ValueError(f"adapter_weights: {len(adapter_weights)} weights for {len(names)} adapters")
        for name, weight in zip(names, adapter_weights):
            components = state["loras"][name]
            if isinstance(weight, dict):
                unknown = [c for c in weight if c not in COMPONENTS]
                if unknown:
                    raise ValueError(f"adapter_weights: unknown components {unknown}; use {list(COMPONENTS)}")
                if any(not isinstance(v, numbers.Number) for v in weight.values()):
                    raise ValueError("adapter_weights: per-block weights are not supported; give one number per component")
                state["weights"][name] = {c: float(weight.get(c, 1.0)) for c in components}
            elif isinstance(weight, numbers.Number):
                state["weights"][name] = {c: float(weight) for c in components}
            else:
                raise ValueError(f"adapter_weights: {weight!r} is neither a number nor a dict by component")
        state["active"] = names
        self._refresh()

    def disable_lora(self):
        """diffusers' `disable_lora`: run without the (unfused) adapters until `enable_lora`."""
        self._adapters()["enabled"] = False
        self._refresh()

    def enable_lora(self):
        self._adapters()["enabled"] = True
        self._refresh()

    def delete_adapters(self, adapter_names):
        """diffusers' `delete_adapters`: forget the adapters (a fused one stays in the weights)."""
        state = self._adapters()
        for name in [adapter_names] if isinstance(adapter_names, str) else list(adapter_names):
            state["loras"].pop(name, None)
            state["weights"].pop(name, None)
            state["keys"].pop(name, None)
            state["merged"] = {m for m in state["merged"] if m[0] != name}
            state["active"] = [n for n in state["active"] if n != name]
        self._refresh()

    def fuse_lora(self, components=None, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names=None,
                  **kwargs):
        """diffusers' `fuse_lora`: add the adapters (`adapter_names`, default the active ones), with their
        weights times `lora_scale`, into the weights of `components` (default: UNet and text encoders).
        `safe_fusing` refuses a fusion that makes a weight non-finite."""
        state = self._adapters()
        names = state["active"] if adapter_names is None else (
            [adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
        for component in components or list(state["parts"]):
            if component not in COMPONENTS:
                raise ValueError(f"components: {component!r} is not one of {list(COMPONENTS)}")
            part = self._part_weights(component)
            if part is None:
                continue
            fusing = [n for n in names if (n, component) not in state["merged"] and component in state["loras"].get(n, {})]
            if safe_fusing:
                deltas = {}
                for name in fusing:
                    weight = state["weights"][name].get(component, 1.0) * lora_scale
                    self._add_deltas(deltas, part, state["loras"][name][component], weight)
                if any(not np.all(np.isfinite(d)) for d in deltas.values()):
                    raise ValueError(f"fuse_lora: the fused {component} weights are not finite; nothing was fused")
            for name in fusing:
                key, layers = state["keys"][name], state["loras"][name][component]
                weight = state["weights"][name].get(component, 1.0) * lora_scale
                part.fused[key] = (layers, part.fused.get(key, (layers, 0.0))[1] + weight)
                state["merged"].add((name, component))
                # as diffusers: PEFT's `scale_layer(lora_scale)` before merging stays on the layer, so
                # after `unfuse_lora` the adapter runs at weight * lora_scale until `set_adapters`
                state["weights"][name][component] *= lora_scale
        self._refresh()

    def unfuse_lora(self, components=None, **kwargs):
        """diffusers' `unfuse_lora`: take the fused adapters out of the weights again; they run unfused
        (if active), as before `fuse_lora`."""
        state = self._adapters()
        components = components or list(state["parts"])
        for component in components:
            part = self._part_weights(component)
            if part is not None:
                part.fused = {}
        state["merged"] = {m for m in state["merged"] if m[1] not in components}
        self._refresh()

    def unload_lora_weights(self):
        """diffusers' `unload_lora_weights`: remove every adapter; what `fuse_lora` fused stays in the
        weights (diffusers' way to keep a fused LoRA without its layers)."""
        state = self._adapters()
        state.update(loras={}, weights={}, keys={}, active=[], merged=set())
        for part in state["parts"].values():  # PEFT's layers removed, their merged weights stay
            for key, (layers, weight) in part.fused.items():
                part.kept[key] = (layers, part.kept.get(key, (layers, 0.0))[1] + weight)
            part.fused = {}
        self._refresh()

    # ---- textual inversion ------------------------------------------------------------------

    def load_textual_inversion(self, pretrained_model_name_or_path, token=None, tokenizer=None, text_encoder=None,
                               **kwargs):
        """diffusers' `load_textual_inversion`: add the embedding(s) of a file (or a {token: vector}
        dict, or a list of either) to `tokenizer` / `text_encoder` (default: the pipeline's first).

        A vector of n rows adds tokens `token`, `token_1`, ..., `token_{n-1}`, and prompts naming
        `token` are expanded to all of them (diffusers' `maybe_convert_prompt`). Formats: diffusers'
        `learned_embeds.safetensors` (the token is its key), A1111 safetensors (`emb_params` or
        `string_to_param.*`: the token is `token`, else the file name without suffix, as A1111), and
        an SDXL embedding (`clip_l` and `clip_g`), which, without `tokenizer` / `text_encoder`, goes
        into both of an SDXL pipeline's encoders."""
        sources = pretrained_model_name_or_path if isinstance(pretrained_model_name_or_path, list) \
            else [pretrained_model_name_or_path]
        tokens = token if isinstance(token, list) else [token] * len(sources)
        if len(tokens) != len(sources):
            raise ValueError(f"token: {len(tokens)} tokens for {len(sources)} embeddings")
        for source, tok in zip(sources, tokens):
            vectors = dict(source) if isinstance(source, dict) else None
            where = "the given dict"
            if vectors is None:
                where = str(source)
                if not Path(source).is_file():
                    raise FileNotFoundError(f"{source}: no such textual-inversion file")
                vectors = read_embedding(source)
            vectors = {k: np.asarray(v, np.float32).reshape(-1, np.shape(v)[-1]) for k, v in vectors.items()}
            if set(vectors) == {"clip_l", "clip_g"} and tokenizer is None and text_encoder is None:
                if getattr(self, "text_encoder_2", None) is None:
                    raise ValueError(f"{where}: an SDXL embedding (clip_l, clip_g); this pipeline has one text encoder")
                pairs = [("tokenizer", "text_encoder", vectors["clip_l"]), ("tokenizer_2", "text_encoder_2", vectors["clip_g"])]
                stem = None if isinstance(source, dict) else Path(source).stem
                for tok_name, enc_name, vector in pairs:
                    if getattr(self, enc_name, None) is not None:
                        self._add_embedding(tok or stem, vector, getattr(self, tok_name), enc_name, where)
                continue
            if len(vectors) != 1:
                raise ValueError(f"{where}: {len(vectors)} tensors ({', '.join(list(vectors)[:4])}); a textual-inversion "
                                 f"file holds one embedding (diffusers' {{token: vector}}, A1111's emb_params)")
            key, vector = next(iter(vectors.items()))
            if key == "emb_params" or key.startswith("string_to_param"):  # A1111: the file names the token
                key = Path(source).stem if not isinstance(source, dict) else key
            enc_name = self._component_of(text_encoder) if text_encoder is not None else "text_encoder"
            tok_obj = tokenizer if tokenizer is not None else getattr(self, enc_name.replace("text_encoder", "tokenizer"))
            self._add_embedding(tok or key, vector, tok_obj, enc_name, where)

    def _component_of(self, text_encoder) -> str:
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(self, name, None) is text_encoder:
                return name
        raise ValueError("text_encoder: not one of this pipeline's text encoders (pipe.text_encoder, pipe.text_encoder_2)")

    def _add_embedding(self, token: str, vectors: np.ndarray, tokenizer, component: str, where: str) -> None:
        part = self._part_weights(component)
        if part is None or tokenizer is None:
            raise ValueError(f"load_textual_inversion: this pipeline has no {component}")
        base_rows = part.map.locations(part.token_embedding)
        rows, width = base_rows[0]["shape"]
        if vectors.shape[1] != width:
            raise ValueError(f"{where}: embedding width {vectors.shape[1]}, but the {component}'s token embedding is "
                             f"{width} wide (an embedding for another model?)")
        names = [token] + [f"{token}_{i}" for i in range(1, len(vectors))]
        vocab = tokenizer.get_vocab()
        if token in vocab or f"{token}_1" in vocab:
            raise ValueError(f"Token {token} already in tokenizer vocabulary. Please choose a different token name")
        present = 0 if part.extra_rows is None else len(part.extra_rows)
        if len(tokenizer) != rows + present:
            raise ValueError(f"load_textual_inversion: the tokenizer has {len(tokenizer)} tokens, the {component}'s "
                             f"embedding {rows + present} rows; pass the tokenizer that belongs to it")
        tokenizer.add_tokens(names)
        part.extra_rows = vectors if part.extra_rows is None else np.concatenate([part.extra_rows, vectors])
        self._refresh([component])

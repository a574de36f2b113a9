"""Prompt encoding, the piece a text-conditioned pipeline has: CLIP tokenizers and text encoders.

`PromptEncoder` is Stable Diffusion 1.x/2.x's (one encoder, its last hidden state); `XLPromptEncoder`
is SDXL's (the penultimate hidden states of two encoders side by side, and the second one's pooled
projection). Both take diffusers' `clip_skip`, read from the `hidden_states.N` outputs the export
writes.
"""

from __future__ import annotations

import numpy as np

from ..model_files import layer_norm_feeding


def as_list(prompt, batch: int) -> list[str]:
    """A prompt (str) for each of `batch` items, or the given list."""
    return [prompt] * batch if isinstance(prompt, str) else list(prompt)


def hidden_state(outputs: dict, skip_from_last: int, part: str) -> np.ndarray:
    """`hidden_states[-skip_from_last]` of a text encoder's outputs (embeddings = hidden_states.0)."""
    names = sorted((k for k in outputs if k.startswith("hidden_states.")), key=lambda k: int(k.rpartition(".")[2]))
    if not names:
        raise ValueError(f"clip_skip: this export's {part} has no hidden_states outputs (an older export); "
                         f"export the model again with sd-export to use clip_skip")
    if skip_from_last > len(names):
        raise ValueError(f"clip_skip: {skip_from_last - 1} skips more layers than the {part}'s {len(names) - 1}")
    return outputs[names[-skip_from_last]].astype(np.float32)


def check_clip_skip(clip_skip) -> None:
    if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, (int, np.integer))
                                  or clip_skip < 0):
        raise ValueError(f"clip_skip must be an integer >= 0 (layers skipped); got {clip_skip!r}")


def repeat_per_image(embeds, count: int):
    """diffusers' `embeds.repeat(1, n, 1).view(batch * n, ...)`: each prompt `count` times in a row."""
    return None if embeds is None else np.repeat(np.asarray(embeds, np.float32), count, axis=0)


class PromptEncoder:
    """Text embeddings from prompts, as diffusers' `StableDiffusionPipeline.encode_prompt` makes them."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self._final_layer_norm = None

    def final_layer_norm(self, hidden: np.ndarray) -> np.ndarray:
        """The text encoder's final LayerNorm, with the weights read from its ONNX file (clip_skip)."""
        if self._final_layer_norm is None:
            self._final_layer_norm = layer_norm_feeding(self.text_encoder.path, "last_hidden_state")
        scale, bias, epsilon = self._final_layer_norm
        mean = hidden.mean(axis=-1, keepdims=True)
        centred = hidden - mean
        variance = np.mean(centred * centred, axis=-1, keepdims=True)
        return centred / np.sqrt(variance + np.float32(epsilon)) * scale + bias

    def embed(self, prompts: list[str], warn: bool = True, clip_skip: int | None = None) -> np.ndarray:
        """The text encoder's last hidden state [B, 77, D] for a list of prompts; with `clip_skip`,
        the hidden state that many layers earlier, through the final layer norm (as diffusers)."""
        # textual inversion: multi-vector tokens expanded, as diffusers' maybe_convert_prompt
        ids = self.tokenizer([self.tokenizer.maybe_convert_prompt(p) for p in prompts], warn=warn)
        outputs = self.text_encoder(input_ids=ids)
        if not clip_skip:  # 0: the final layer norm of the last hidden state, the graph's own output
            return outputs["last_hidden_state"].astype(np.float32)
        return self.final_layer_norm(hidden_state(outputs, clip_skip + 1, "text_encoder"))

    def __call__(self, prompt, num_images_per_prompt: int, do_classifier_free_guidance: bool,
                 negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None, clip_skip=None):
        """Embeddings of the prompts, each repeated `num_images_per_prompt` times; and, with
        guidance, the negative ones (empty prompts when none given). `clip_skip` applies to the
        prompt only, as in diffusers."""
        check_clip_skip(clip_skip)
        if prompt_embeds is None:
            prompt_embeds = self.embed(as_list(prompt, 1), clip_skip=clip_skip)
        prompt_embeds = np.asarray(prompt_embeds, dtype=np.float32)
        batch_size = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negatives = as_list("" if negative_prompt is None else negative_prompt, batch_size)
            negative_prompt_embeds = self.embed(negatives, warn=False)  # diffusers warns for prompts only
        return repeat_per_image(prompt_embeds, num_images_per_prompt), \
            repeat_per_image(negative_prompt_embeds, num_images_per_prompt)


class XLPromptEncoder:
    """SDXL's prompt encoding (diffusers' `StableDiffusionXLPipeline.encode_prompt`).

    `pairs` are (tokenizer, text_encoder) for the encoders the model has: both for the base, only the
    second for the refiner. Each encoder's penultimate hidden state (`clip_skip` layers earlier, for
    the prompt; no final layer norm, as diffusers) is concatenated on the feature axis; the pooled
    embedding is the second encoder's `text_embeds`. With `force_zeros_for_empty_prompt` and no
    negative prompt, the negative embeddings are zeros.
    """

    def __init__(self, pairs, force_zeros_for_empty_prompt: bool = True):
        self.pairs = list(pairs)
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    def embed(self, prompts_per_encoder, warn: bool, clip_skip: int | None):
        """(hidden states of every encoder, concatenated [B, 77, D1 + D2], pooled [B, P])."""
        hidden, pooled = [], None
        for (tokenizer, encoder), prompts in zip(self.pairs, prompts_per_encoder):
            prompts = [tokenizer.maybe_convert_prompt(p) for p in prompts]  # textual inversion, as diffusers
            outputs = encoder(input_ids=tokenizer(prompts, warn=warn))
            if pooled is None and "text_embeds" in outputs:
                pooled = outputs["text_embeds"].astype(np.float32)
            hidden.append(hidden_state(outputs, 2 + (clip_skip or 0), getattr(encoder, "name", "text_encoder")))
        if pooled is None:
            raise ValueError("text_encoder_2: the model's second text encoder has no 'text_embeds' output")
        return np.concatenate(hidden, axis=-1), pooled

    def __call__(self, prompt, prompt_2, num_images_per_prompt: int, do_classifier_free_guidance: bool,
                 negative_prompt=None, negative_prompt_2=None, prompt_embeds=None, negative_prompt_embeds=None,
                 pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, clip_skip=None):
        """(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds),
        each repeated `num_images_per_prompt` times; the negatives are None without guidance."""
        check_clip_skip(clip_skip)
        if prompt_embeds is None:
            prompts = as_list(prompt, 1)
            prompts_2 = as_list(prompt_2 or prompt, len(prompts))
            per_encoder = [prompts, prompts_2][-len(self.pairs):]  # the refiner: only the second encoder
            prompt_embeds, pooled = self.embed(per_encoder, True, clip_skip)
            pooled_prompt_embeds = pooled if pooled_prompt_embeds is None else pooled_prompt_embeds
        prompt_embeds = np.asarray(prompt_embeds, np.float32)
        batch = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is None and self.force_zeros_for_empty_prompt:
                negative_prompt_embeds = np.zeros_like(prompt_embeds)
                negative_pooled_prompt_embeds = np.zeros_like(np.asarray(pooled_prompt_embeds, np.float32))
            else:
                negatives = as_list(negative_prompt or "", batch)
                negatives_2 = as_list(negative_prompt_2 or negative_prompt or "", batch)
                negative_prompt_embeds, pooled = self.embed([negatives, negatives_2][-len(self.pairs):], False, None)
                if negative_pooled_prompt_embeds is None:
                    negative_pooled_prompt_embeds = pooled
        if not do_classifier_free_guidance:
            negative_prompt_embeds = negative_pooled_prompt_embeds = None
        n = num_images_per_prompt
        return (repeat_per_image(prompt_embeds, n), repeat_per_image(negative_prompt_embeds, n),
                repeat_per_image(pooled_prompt_embeds, n), repeat_per_image(negative_pooled_prompt_embeds, n))

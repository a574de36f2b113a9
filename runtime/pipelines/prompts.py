"""Prompt encoding, the piece a text-conditioned pipeline has: a CLIP tokenizer and text encoder."""

from __future__ import annotations

import numpy as np


class PromptEncoder:
    """Text embeddings from prompts, as diffusers' `StableDiffusionPipeline.encode_prompt` makes them."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder

    def embed(self, prompts: list[str], warn: bool = True) -> np.ndarray:
        """The text encoder's last hidden state [B, 77, D] for a list of prompts."""
        ids = self.tokenizer(prompts, warn=warn)
        return self.text_encoder(input_ids=ids)["last_hidden_state"].astype(np.float32)

    def __call__(self, prompt, num_images_per_prompt: int, do_classifier_free_guidance: bool,
                 negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None):
        """Embeddings of the prompts, each repeated `num_images_per_prompt` times; and, with
        guidance, the negative ones (empty prompts when none given)."""
        if prompt_embeds is None:
            prompt_embeds = self.embed([prompt] if isinstance(prompt, str) else list(prompt))
        prompt_embeds = np.asarray(prompt_embeds, dtype=np.float32)
        batch_size = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is None:
                negatives = [""] * batch_size
            elif isinstance(negative_prompt, str):
                negatives = [negative_prompt] * batch_size
            else:
                negatives = list(negative_prompt)
            negative_prompt_embeds = self.embed(negatives, warn=False)  # diffusers warns for prompts only
        # diffusers: embeds.repeat(1, n, 1).view(batch * n, seq, dim), i.e. each prompt n times in a row
        prompt_embeds = np.repeat(prompt_embeds, num_images_per_prompt, axis=0)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = np.repeat(np.asarray(negative_prompt_embeds, np.float32), num_images_per_prompt, 0)
        return prompt_embeds, negative_prompt_embeds

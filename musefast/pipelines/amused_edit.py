"""``AmusedImg2ImgPipeline`` and ``AmusedInpaintPipeline``: diffusers' two aMUSEd edit pipelines.

They are :class:`~musefast.AmusedPipeline` (which takes ``image=`` and ``mask_image=`` itself)
with diffusers' call signature for the edit: ``image`` second and required, and
``strength`` defaulting to 0.5 (image-to-image) or 1.0 (inpainting). Built, loaded and saved as
AmusedPipeline; ``save_pretrained`` writes the class name, so ``from_pretrained`` of either
library loads the same class back. Other musefast arguments (``seed``, ``sampler``, ``cache``,
...) pass through ``**kwargs``.
"""
from __future__ import annotations

import torch

from musefast.pipelines.amused import AmusedPipeline


class AmusedImg2ImgPipeline(AmusedPipeline):
    """aMUSEd image-to-image: the image's tokens, partly re-masked (``strength``), are decoded again."""

    @torch.no_grad()
    def __call__(self, prompt=None, image=None, strength: float = 0.5, num_inference_steps: int | None = None,
                 guidance_scale: float = 10.0, negative_prompt=None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | None = None, prompt_embeds=None, encoder_hidden_states=None,
                 negative_prompt_embeds=None, negative_encoder_hidden_states=None, output_type: str = "pil",
                 return_dict: bool | None = None, callback=None, callback_steps: int = 1,
                 cross_attention_kwargs: dict | None = None, micro_conditioning_aesthetic_score: float = 6,
                 micro_conditioning_crop_coord: tuple[int, int] = (0, 0), temperature=(2, 0),
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs: list[str] | None = None, **kwargs):
        if image is None:
            raise ValueError(f"{type(self).__name__} needs image= (the image to edit)")
        return super().__call__(
            prompt, None, None, num_inference_steps, guidance_scale, negative_prompt, num_images_per_prompt,
            generator, None, prompt_embeds, encoder_hidden_states, negative_prompt_embeds,
            negative_encoder_hidden_states, output_type, return_dict, callback, callback_steps,
            cross_attention_kwargs, micro_conditioning_aesthetic_score, micro_conditioning_crop_coord, temperature,
            image=image, strength=strength, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, **kwargs)


class AmusedInpaintPipeline(AmusedPipeline):
    """aMUSEd inpainting: the tokens under the white part of ``mask_image`` are decoded again."""

    @torch.no_grad()
    def __call__(self, prompt=None, image=None, mask_image=None, strength: float = 1.0,
                 num_inference_steps: int | None = None, guidance_scale: float = 10.0, negative_prompt=None,
                 num_images_per_prompt: int = 1, generator: torch.Generator | None = None, prompt_embeds=None,
                 encoder_hidden_states=None, negative_prompt_embeds=None, negative_encoder_hidden_states=None,
                 output_type: str = "pil", return_dict: bool | None = None, callback=None, callback_steps: int = 1,
                 cross_attention_kwargs: dict | None = None, micro_conditioning_aesthetic_score: float = 6,
                 micro_conditioning_crop_coord: tuple[int, int] = (0, 0), temperature=(2, 0),
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs: list[str] | None = None, **kwargs):
        if image is None or mask_image is None:
            raise ValueError(f"{type(self).__name__} needs image= and mask_image= (white = repaint)")
        return super().__call__(
            prompt, None, None, num_inference_steps, guidance_scale, negative_prompt, num_images_per_prompt,
            generator, None, prompt_embeds, encoder_hidden_states, negative_prompt_embeds,
            negative_encoder_hidden_states, output_type, return_dict, callback, callback_steps,
            cross_attention_kwargs, micro_conditioning_aesthetic_score, micro_conditioning_crop_coord, temperature,
            image=image, mask_image=mask_image, strength=strength, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, **kwargs)


__all__ = ["AmusedImg2ImgPipeline", "AmusedInpaintPipeline"]

"""What a diffusers pipeline offers its user beyond ``__call__``, for musefast's aMUSEd-family pipelines.

``components``, ``progress_bar`` / ``set_progress_bar_config``, ``enable_attention_slicing``
(a no-op: musefast's attention never materialises the full score matrix, so slicing would
save nothing), ``enable_model_cpu_offload``, and the call state diffusers' step callbacks read
(``guidance_scale``, ``num_timesteps``), and output objects that answer ``.images`` and
``[0]`` as diffusers' do. The pipeline class names its components in
``_component_names`` and maps each to the object it holds in ``_component``.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from musefast.pipelines.callbacks import CALLBACK_TENSOR_INPUTS
from musefast.pipelines.images import ImageList, PipelineOutput
from musefast.pipelines.options import ProgressBarConfig, check_device

# diffusers' loader reports each component it loads on this logger; musefast's loader reports
# there too, so a diffusers user's logging set-up shows musefast's loads the same way
LOAD_LOGGER = logging.getLogger("diffusers.pipelines.pipeline_utils")


class PipelineConveniences(ProgressBarConfig):
    """What every musefast pipeline offers a diffusers user besides the call: ``components``,
    ``progress_bar``, attention slicing (a documented no-op), the progress-bar config."""

    _component_names: tuple[str, ...] = ()

    def _component(self, name: str):
        return getattr(self, name)

    @property
    def components(self) -> dict:
        """The pipeline's components by name (``type(pipe)(**pipe.components)`` rebuilds it)."""
        return {name: self._component(name) for name in self._component_names}

    def progress_bar(self, iterable=None, total=None):
        """A tqdm bar with the options of :meth:`set_progress_bar_config` (as diffusers' pipelines offer)."""
        from tqdm.auto import tqdm

        config = dict(self._progress_bar_config or {})
        if iterable is not None:
            return tqdm(iterable, **config)
        if total is not None:
            return tqdm(total=total, **config)
        raise ValueError("progress_bar() needs an iterable or a total")

    def enable_attention_slicing(self, slice_size="auto") -> None:
        """Accepted for diffusers compatibility and does nothing: musefast's attention kernels
        never hold the full attention matrix, so slicing saves no memory and changes no result."""

    def disable_attention_slicing(self) -> None:
        """See :meth:`enable_attention_slicing`: nothing to undo."""


class DiffusersPipelineAPI(PipelineConveniences):
    _optional_components: list[str] = []
    _callback_tensor_inputs: list[str] = list(CALLBACK_TENSOR_INPUTS)
    _offload_device: torch.device | None = None
    _guidance_scale: float | None = None
    _num_timesteps: int | None = None

    @property
    def guidance_scale(self) -> float | None:
        """The guidance scale of the running (or last) call; a step callback may change it, as in diffusers."""
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int | None:
        """Decoding steps of the running (or last) call."""
        return self._num_timesteps

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device = "cuda") -> None:
        """Keep the models on the CPU between calls and run each call on ``device``: the whole
        pipeline moves there for the call and back after it (diffusers moves one model at a
        time; musefast's decoding loop needs the transformer and the text encoder together)."""
        dev = torch.device(device) if gpu_id is None else torch.device(torch.device(device).type, gpu_id)
        if dev.type != "cuda" or not torch.cuda.is_available():  # the same answer as MusePipeline's
            raise RuntimeError("enable_model_cpu_offload moves components between the CPU and a CUDA GPU, and no "
                               "CUDA GPU is available here: the pipeline already runs on the CPU, nothing to do")
        self._offload_device = check_device(dev)
        self.to("cpu")

    @contextlib.contextmanager
    def _offloaded(self):
        if self._offload_device is None:
            yield
            return
        self.to(self._offload_device)
        try:
            yield
        finally:
            self.to("cpu")


class ImageArray(np.ndarray):
    """A numpy batch of images that also answers ``.images`` (diffusers' ``pipe(...).images``)."""

    @property
    def images(self) -> "ImageArray":
        return self


def with_images(images):
    """The images of a call, answering ``.images`` whatever their kind: a list of PIL images, a
    numpy array, or a tensor (pixels or tokens)."""
    if isinstance(images, list):
        return ImageList(images)
    if isinstance(images, np.ndarray):
        return images.view(ImageArray)
    if isinstance(images, torch.Tensor):
        images.images = images  # tensors take attributes; a subclass would leak into every op on it
    return images


@dataclass
class AmusedPipelineOutput(PipelineOutput):
    """diffusers' output object: ``.images``, and ``out[0]`` / unpacking as diffusers' ``BaseOutput``."""

    def __getitem__(self, index):
        return (self.images,)[index]

    def __iter__(self):
        return iter((self.images,))

    def __len__(self) -> int:
        return 1


def pipeline_output(images, return_dict: bool | None):
    """What a pipeline call returns, for every pipeline: the images themselves (``None``,
    musefast's default), diffusers' output object (True) or a 1-tuple (False); each form
    answers ``.images``."""
    images = with_images(images)
    if return_dict is None:
        return images
    return AmusedPipelineOutput(images) if return_dict else (images,)

"""musefast: fast, faithful inference for Muse-style masked generative image transformers."""
from musefast import _kernels_path

_kernels_path.install()  # before anything imports musefast.kernels

from musefast import ops
from musefast.doctor import doctor
from musefast.compat.amused_accelerate import accelerate
from musefast.pipelines import MusePipeline, generate, load
from musefast.pipelines.amused import AmusedPipeline
from musefast.pipelines.amused_edit import AmusedImg2ImgPipeline, AmusedInpaintPipeline
from musefast.pipelines.meissonic import MeissonicPipeline
from musefast.batch import batch_generate
from musefast.sampling.cache import StepCache

__version__ = "0.1.0"
__all__ = ["ops", "doctor", "generate", "load", "MusePipeline", "AmusedPipeline", "AmusedImg2ImgPipeline",
           "AmusedInpaintPipeline", "MeissonicPipeline", "accelerate",
           "batch_generate", "StepCache", "__version__"]

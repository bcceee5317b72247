"""musefast: fast, faithful inference for Muse-style masked generative image transformers."""
from musefast import ops
from musefast.doctor import doctor
from musefast.pipelines import MusePipeline, generate, load

__version__ = "0.1.0"
__all__ = ["ops", "doctor", "generate", "load", "MusePipeline", "__version__"]

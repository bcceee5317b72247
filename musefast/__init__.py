"""musefast: fast, faithful inference for Muse-style masked generative image transformers."""
from musefast import ops
from musefast.doctor import doctor

__version__ = "0.1.0"
__all__ = ["ops", "doctor", "__version__"]

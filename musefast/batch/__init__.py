"""Many images: rows -> requests on the generation engine -> images + a durable manifest."""
from musefast.batch.runner import batch_generate

__all__ = ["batch_generate"]

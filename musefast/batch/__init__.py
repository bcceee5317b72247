"""Many images: rows -> batches of equal settings -> images + a durable manifest (DESIGN §11)."""
from musefast.batch.runner import batch_generate

__all__ = ["batch_generate"]

"""The public ops of musefast and their backend registry (DESIGN §3, §4)."""
from musefast.ops.registry import BackendUnavailableError, backends, op
from musefast.ops.vq import vq_lookup, vq_nearest

__all__ = ["vq_nearest", "vq_lookup", "backends", "op", "BackendUnavailableError"]

"""The public ops of musefast and their backend registry (musefast.ops.registry)."""
from musefast.ops import selfcheck as _selfcheck
from musefast.ops.attention import attention
from musefast.ops.registry import BackendUnavailableError, backends, op, use_backend
from musefast.ops.remask import cfg_sample_remask
from musefast.ops.rms_norm import rms_norm_modulate
from musefast.ops.rope import qk_norm_rope
from musefast.ops.vq import vq_lookup, vq_nearest

__all__ = ["vq_nearest", "vq_lookup", "attention", "cfg_sample_remask", "qk_norm_rope", "rms_norm_modulate",
           "backends", "op", "use_backend", "BackendUnavailableError"]

_selfcheck.install()  # each op gets its per-device check before its first auto-selection

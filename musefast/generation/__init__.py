"""The generation engine: :class:`Request` in, steps batched across requests, images out.

``Engine(musefast.load(...))`` with ``submit(request) -> handle`` and ``step()``; one adapter
per model family (``adapters/``) says how that family encodes text, prepares its contexts,
runs a forward over rows and decodes.
"""
from musefast.generation.adapters import Adapter, adapter_for
from musefast.generation.request import Request
from musefast.generation.scheduler import Cancelled, Engine, Handle, QueueFull, State

__all__ = ["Adapter", "Cancelled", "Engine", "Handle", "QueueFull", "Request", "State", "adapter_for"]

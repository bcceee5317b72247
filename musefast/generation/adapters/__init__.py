"""One adapter per model family; :func:`adapter_for` picks the one of a loaded pipeline."""
from __future__ import annotations

from musefast.generation.adapters.base import Adapter, Stage


def adapter_for(pipe) -> Adapter:
    """The adapter of ``pipe`` (a MusePipeline, AmusedPipeline or MeissonicPipeline, whatever
    format it was loaded from), or ``pipe`` itself when it is already an adapter."""
    if isinstance(pipe, Adapter):
        return pipe
    # a pipeline names its family (``engine_family``); the engine imports no pipeline class
    family = getattr(type(pipe), "engine_family", None)
    if family == "meissonic":
        from musefast.generation.adapters.meissonic import MeissonicAdapter

        return MeissonicAdapter(pipe)
    if family == "amused":
        from musefast.generation.adapters.uvit import UVitAdapter

        return UVitAdapter(pipe)
    if family == "muse":
        from musefast.generation.adapters.muse import MuseAdapter

        return MuseAdapter(pipe)
    raise TypeError(f"no generation adapter for {type(pipe).__name__}: the engine runs MusePipeline, "
                    "AmusedPipeline and MeissonicPipeline models")


__all__ = ["Adapter", "Stage", "adapter_for"]

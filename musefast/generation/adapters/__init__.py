"""One adapter per model family; :func:`adapter_for` picks the one of a loaded pipeline."""
from __future__ import annotations

from musefast.generation.adapters.base import Adapter, Stage


def adapter_for(pipe) -> Adapter:
    """The adapter of ``pipe`` (a MusePipeline, AmusedPipeline or MeissonicPipeline, whatever
    format it was loaded from), or ``pipe`` itself when it is already an adapter."""
    if isinstance(pipe, Adapter):
        return pipe
    from musefast.pipelines.amused import AmusedPipeline
    from musefast.pipelines.meissonic import MeissonicPipeline
    from musefast.pipelines.muse import MusePipeline

    if isinstance(pipe, MeissonicPipeline):  # before AmusedPipeline: it subclasses it
        from musefast.generation.adapters.meissonic import MeissonicAdapter

        return MeissonicAdapter(pipe)
    if isinstance(pipe, AmusedPipeline):
        from musefast.generation.adapters.uvit import UVitAdapter

        return UVitAdapter(pipe)
    if isinstance(pipe, MusePipeline):
        from musefast.generation.adapters.muse import MuseAdapter

        return MuseAdapter(pipe)
    raise TypeError(f"no generation adapter for {type(pipe).__name__}: the engine runs MusePipeline, "
                    "AmusedPipeline and MeissonicPipeline models")


__all__ = ["Adapter", "Stage", "adapter_for"]

"""Deprecated name of :mod:`musefast.cpu` (the CPU execution paths), kept so code written against
the documented ``musefast.engine.cpu`` / ``cpu_conv`` / ``int8`` names keeps running. Importing it
warns once; every old module name resolves to its new module."""
import importlib
import sys
import warnings

warnings.warn("musefast.engine is now musefast.cpu (musefast.engine.cpu -> musefast.cpu.linear, "
              "cpu_conv -> cpu.conv, cpu_attention -> cpu.attention, cpu_norms -> cpu.norms, "
              "int8 -> cpu.int8); update the import", DeprecationWarning, stacklevel=2)

_RENAMED = {"cpu": "linear", "cpu_conv": "conv", "cpu_attention": "attention", "cpu_norms": "norms", "int8": "int8"}

for _old, _new in _RENAMED.items():
    _module = importlib.import_module(f"musefast.cpu.{_new}")
    globals()[_old] = _module
    sys.modules[f"{__name__}.{_old}"] = _module  # `import musefast.engine.cpu` finds the new module

__all__ = list(_RENAMED)

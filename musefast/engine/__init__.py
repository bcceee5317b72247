"""Deprecated name of :mod:`musefast.cpu` (the CPU execution paths), kept so code written against
the documented ``musefast.engine.cpu`` / ``cpu_conv`` / ``int8`` names keeps running. Importing it
warns once; every old module name resolves to its new module."""
import importlib
import sys
import warnings

warnings.warn("musefast.engine is now musefast.cpu (musefast.engine.cpu -> musefast.cpu.linear, "
              "cpu_conv -> cpu.conv, int8 -> cpu.int8; cpu_attention -> ops.attention, the bmm backend; "
              "cpu_norms -> ops.rms_norm); update the import", DeprecationWarning, stacklevel=2)

_RENAMED = {"cpu": "cpu.linear", "cpu_conv": "cpu.conv", "cpu_attention": "ops.attention", "cpu_norms": "ops.rms_norm",
            "int8": "cpu.int8"}

for _old, _new in _RENAMED.items():
    _module = importlib.import_module(f"musefast.{_new}")
    globals()[_old] = _module
    sys.modules[f"{__name__}.{_old}"] = _module  # `import musefast.engine.cpu` finds the new module

__all__ = list(_RENAMED)

"""The CPU execution paths: they change how a model runs on a CPU, not what it computes.

``linear``: packed oneDNN linears with fused epilogues, ``dtype="auto"``, install/remove/report;
``conv``: channels-last VQ decoding; ``int8``: the opt-in int8 linears; ``isa``: what oneDNN may
use here. The CPU kernels of the ops (the ``bmm`` attention, the one-pass RMSNorm + modulation)
are backends of those ops, in :mod:`musefast.ops`.
Kept free of imports here, so a model module can import one path without loading the others.
"""

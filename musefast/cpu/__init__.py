"""The CPU execution paths: they change how a model runs on a CPU, not what it computes.

``linear``: packed oneDNN linears with fused epilogues, ``dtype="auto"``, install/remove/report;
``conv``: channels-last VQ decoding; ``attention``: the ``bmm`` attention backend; ``norms``: the
one-pass RMSNorm + modulation kernel; ``int8``: the opt-in int8 linears.
Kept free of imports here, so a model module can import one path without loading the others.
"""

"""Execution paths that change how a model runs, not what it computes (DESIGN §2): ``cpu``."""

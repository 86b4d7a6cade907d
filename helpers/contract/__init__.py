"""The root helper's public contract: the only part of autoglm_helper the tuner imports.

bus (names, methods, error kinds, reply shapes), catalogue (what may be written), plan_schema (the plan on the
wire) and procfs (the /proc text parsers both sides share). Standard library only, no I/O of its own.
"""

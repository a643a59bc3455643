"""Ops: one module per step of the MoE pipeline, each with a ``<op>_ref`` torch twin."""

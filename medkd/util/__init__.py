"""Leaves: files, content keys, the generic registry, data-parallel ranks, the machine a run ran on.

Nothing here imports another layer of medkd. Imports none of its modules (each is imported by name).
"""

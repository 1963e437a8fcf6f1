"""Pieces both sides need: the classifier, data readers and partitioning, wire helpers.

Everything here is safe for an edge device: no coordinator-only dependency.
"""

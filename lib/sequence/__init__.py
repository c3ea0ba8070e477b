"""Sequence stage: series batching over per-slice features, and the OOF strategies that train the heads."""

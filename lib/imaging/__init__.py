"""Pixels to model inputs: named CT windows, window policies, the head crop and the on-disk image cache."""

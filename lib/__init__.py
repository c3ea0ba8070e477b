"""RSNA intracranial hemorrhage detection: the thin, tested library behind the notebooks.

Importing `lib` has no side effects: no prints, no network, no data loading.
"""

__version__ = "0.1.0"

"""RSNA intracranial hemorrhage detection: the thin, tested library behind the notebooks.

Importing `lib` prints nothing, loads no data and touches no network. Its one side effect: albumentations' update
check (an HTTPS request at import, 2 s timeout, then a UserWarning when offline, as on Kaggle kernels and GPU boxes
without internet) is switched off unless the caller set NO_ALBUMENTATIONS_UPDATE.
"""
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"

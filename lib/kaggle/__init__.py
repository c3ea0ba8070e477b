"""Kaggle: dataset and kernel packaging, kernel metadata, the run bundle, and offline inference."""

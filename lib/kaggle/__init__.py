"""Kaggle: dataset and kernel packaging, kernel metadata and the run bundle (the ICH kernel's test-only
inference is `lib.tasks.ich.infer`)."""

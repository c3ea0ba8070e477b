"""Data for training: folds, datasets and loaders, augmentation recipes (label names come from the task)."""

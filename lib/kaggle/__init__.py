"""Kaggle: dataset and kernel packaging, kernel metadata and the run bundle, for every task whose spec declares a
kernel (extra["kernel"]); each task's test-only inference lives in its package (`lib.tasks.ich.infer`,
`lib.tasks.brats.infer`)."""

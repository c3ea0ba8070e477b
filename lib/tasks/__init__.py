"""Per-competition task packages: data layers, generators and task-specific helpers."""

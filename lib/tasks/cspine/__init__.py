"""RSNA 2022 Cervical Spine Fracture Detection: the synthetic data generator (phantom) and task-specific code."""

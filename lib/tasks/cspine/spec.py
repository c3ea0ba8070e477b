"""The cervical-spine task, declared once: RSNA 2022 Cervical Spine Fracture Detection.

Built so far: the built-in data (`python -m lib.phantom cspine`), CT study volumes and segmentations on the same
grid (`lib.io.ct_volume`) and the per-study weighted log loss (`lib.evaluate.study_logloss`,
`lib.tasks.cspine.metric`), and the library pieces of both stages: the volume cache (`lib.imaging.volume_cache`),
3D segmentation (`lib.models.seg3d`, `lib.models.csn`, `lib.tasks.cspine.seg`), per-vertebra crops with the
visibility rule (`crops`), the 3D CSN and 2.5D classifiers (`classify`) and the patient_overall rules (`overall`).
The notebooks are not written yet, so `stages` is empty and the runner refuses a params file for this task, saying so.
"""
from lib.tasks import TaskSpec
from lib.tasks.cspine.metric import CSPINE_LABELS, CSPINE_NEG_WEIGHTS

SPEC = TaskSpec(
    name="cspine",
    competition="rsna-2022-cervical-spine-fracture-detection",
    labels=CSPINE_LABELS,
    weights=tuple(CSPINE_NEG_WEIGHTS[c] for c in CSPINE_LABELS),  # negative-row weights; positives count double
    metric="study_weighted_log_loss",
    stages={},
    layout={"train_images": "train_images", "test_images": "test_images", "train_labels": "train.csv",
            "boxes": "train_bounding_boxes.csv", "segmentations": "segmentations", "test": "test.csv",
            "sample_submission": "sample_submission.csv"},
    submission_columns=("row_id", "fractured"),
    id_pattern=r"1\.2\.826\.0\.1\.3680043\.[0-9]+",
    phantom="lib.tasks.cspine.phantom",
    description="per-vertebra and per-study fracture probability from neck CT; per-study weighted log loss",
)

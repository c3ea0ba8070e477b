"""The BraTS task, declared once: RSNA-MICCAI Brain Tumor Radiogenomic Classification 2021 (MGMT from MR).

Built so far: the built-in data (`python -m lib.phantom brats`), NIfTI / MR-series IO (`lib.io.nifti`,
`lib.io.mr_series`). The pipeline stages (segmentation, classification, ensemble, report, kernel) are not built
yet, so `stages` is empty and the runner refuses a params file for this task, saying so.
"""
from lib.tasks import TaskSpec

SPEC = TaskSpec(
    name="brats",
    competition="rsna-miccai-brain-tumor-radiogenomic-classification",
    labels=("MGMT_value",),
    weights=(1.0,),
    metric="mean_auc",
    stages={},
    layout={"task1": "task1", "train_images": "task2/train", "test_images": "task2/test",
            "train_labels": "task2/train_labels.csv", "sample_submission": "task2/sample_submission.csv"},
    submission_columns=("BraTS21ID", "MGMT_value"),
    id_pattern=r"[0-9]{5}",
    phantom="lib.tasks.brats.phantom",
    description="patient-level MGMT promoter methylation from four MR sequences; ROC-AUC over patients",
)

"""The BraTS task, declared once: RSNA-MICCAI Brain Tumor Radiogenomic Classification 2021 (MGMT from MR).

Stages (notebooks/brats/): EDA, preprocess (task-2 series cache, task-1 segmentation slices without the task-2
patients), stage-1 segmentation (smp Unet++), mask prediction with the seed's zoom and contour filter, stage-2
classifier per MRI type (CNN + BiLSTM over slice chunks, or the 1st place's 3D ResNet10), ensemble + submission,
report, and test-only inference (the source of the Kaggle kernel). The data folder holds `task2/` (the Kaggle
download) and `task1/` (the task-1 NIfTI set).
"""
from lib.tasks import TaskSpec
from lib.tasks.brats.data import COMPETITION, ID_PATTERN

SPEC = TaskSpec(
    name="brats",
    competition=COMPETITION,
    labels=("MGMT_value",),
    weights=(1.0,),
    metric="mean_auc",
    stages={
        "eda": "00_eda.ipynb",
        "preprocess": "01_preprocess.ipynb",
        "train_seg": "02_train_seg.ipynb",
        "predict_masks": "03_predict_masks.ipynb",
        "train_cls": "04_train_classifier.ipynb",
        "ensemble": "05_ensemble.ipynb",
        "report": "06_report.ipynb",
        "inference": "07_inference.ipynb",
    },
    layout={"task1": "task1", "train_images": "task2/train", "test_images": "task2/test",
            "train_labels": "task2/train_labels.csv", "sample_submission": "task2/sample_submission.csv"},
    submission_columns=("BraTS21ID", "MGMT_value"),
    id_pattern=ID_PATTERN,
    phantom="lib.tasks.brats.phantom",
    extra={"summary": "lib.tasks.brats.pipeline:summary",  # python -m lib.report RUN prints this table
           "bench": {"brats-preprocess": "lib.tasks.brats.bench:add_preprocess_parser",  # python -m lib.bench ...
                     "brats-classifier": "lib.tasks.brats.bench:add_classifier_parser"},
           # python -m lib.kaggle ... (lib.kaggle.package.KernelSpec); the Kaggle image lacks smp and monai
           "kernel": {"notebook": "07_inference.ipynb", "code_slug": "rsna-brats-code",
                      "weights_prefix": "rsna-brats-weights", "wheels_slug": "rsna-brats-wheels",
                      "collect_weights": "lib.tasks.brats.infer:collect_weights", "half": ["seg", "cls_"],
                      "wheels": ["pylibjpeg>=2.0,<3", "pylibjpeg-libjpeg>=2.3,<3", "pylibjpeg-openjpeg>=2.4,<3",
                                 "segmentation-models-pytorch>=0.5,<0.6", "monai>=1.3,<2"]}},
    description="patient-level MGMT promoter methylation from four MR sequences; ROC-AUC over patients",
)

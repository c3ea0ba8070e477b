"""The cervical-spine task, declared once: RSNA 2022 Cervical Spine Fracture Detection.

Stages (notebooks/cspine/): EDA; volumes (every study -> HU volume ordered along the normal, windowed and resampled
onto the segmentation grid, with its mask); 3D C1-C7 segmentation (the seed's CSN U-Net, or MONAI's); masks for
every study + per-vertebra crops from the native CT with the visibility rule; vertebra classifiers (the seed's 3D
CSN, the 1st place's 2.5D CNN + sequence head) on study folds with the per-study metric; OOF-tuned blend,
patient_overall rule and submission (the test.csv fallback); report; test-only inference (the source of the Kaggle
kernel).
"""
from lib.tasks import TaskSpec
from lib.tasks.cspine.data import COMPETITION, ID_PATTERN
from lib.tasks.cspine.metric import CSPINE_LABELS, CSPINE_NEG_WEIGHTS

SPEC = TaskSpec(
    name="cspine",
    competition=COMPETITION,
    labels=CSPINE_LABELS,
    weights=tuple(CSPINE_NEG_WEIGHTS[c] for c in CSPINE_LABELS),  # negative-row weights; positives count double
    metric="study_weighted_log_loss",
    stages={
        "eda": "00_eda.ipynb",
        "volumes": "01_volumes.ipynb",
        "train_seg": "02_train_seg.ipynb",
        "crops": "03_crops.ipynb",
        "train_cls": "04_train_classifier.ipynb",
        "ensemble": "05_ensemble.ipynb",
        "report": "06_report.ipynb",
        "inference": "07_inference.ipynb",
    },
    layout={"train_images": "train_images", "test_images": "test_images", "train_labels": "train.csv",
            "boxes": "train_bounding_boxes.csv", "segmentations": "segmentations", "test": "test.csv",
            "sample_submission": "sample_submission.csv"},
    submission_columns=("row_id", "fractured"),
    id_pattern=ID_PATTERN,
    phantom="lib.tasks.cspine.phantom",
    extra={"summary": "lib.tasks.cspine.pipeline:summary",  # python -m lib.report RUN prints this table
           "bench": {"cspine-volumes": "lib.tasks.cspine.bench:add_volumes_parser",  # python -m lib.bench ...
                     "cspine-seg": "lib.tasks.cspine.bench:add_seg_parser"},
           # python -m lib.kaggle ... (lib.kaggle.package.KernelSpec); the Kaggle image lacks monai and pylibjpeg
           "kernel": {"notebook": "07_inference.ipynb", "code_slug": "rsna-cspine-code",
                      "weights_prefix": "rsna-cspine-weights", "wheels_slug": "rsna-cspine-wheels",
                      "collect_weights": "lib.tasks.cspine.infer:collect_weights", "half": ["seg3d", "cls_"],
                      "wheels": ["pylibjpeg>=2.0,<3", "pylibjpeg-libjpeg>=2.3,<3", "pylibjpeg-openjpeg>=2.4,<3",
                                 "monai>=1.3,<2"]}},
    description="per-vertebra and per-study fracture probability from neck CT; per-study weighted log loss",
)

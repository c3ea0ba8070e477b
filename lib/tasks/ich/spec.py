"""The ICH task, declared once: RSNA Intracranial Hemorrhage Detection 2019 (stage 2 data)."""
from lib.tasks import TaskSpec
from lib.tasks.ich.data import COMPETITION, ID_PATTERN
from lib.tasks.ich.labels import SUBTYPES, WEIGHTS

SPEC = TaskSpec(
    name="ich",
    competition=COMPETITION,
    labels=SUBTYPES,
    weights=tuple(float(w) for w in WEIGHTS),
    metric="weighted_log_loss",
    stages={
        "eda": "00_eda.ipynb",
        "windowing": "01_windowing.ipynb",
        "train_cnn": "02_train_cnn.ipynb",
        "embed": "03_embed.ipynb",
        "sequence": "04_sequence.ipynb",
        "ensemble": "05_ensemble.ipynb",
        "report": "06_report.ipynb",
        "inference": "07_inference.ipynb",
    },
    layout={"train_images": "stage_2_train", "test_images": "stage_2_test", "train_labels": "stage_2_train.csv",
            "sample_submission": "stage_2_sample_submission.csv"},
    submission_columns=("ID", "Label"),
    id_pattern=ID_PATTERN,
    phantom="lib.tasks.ich.phantom",
    extra={"kernel": {"notebook": "07_inference.ipynb", "code_slug": "rsna-ich-code",  # lib.kaggle.package.KernelSpec
                      "weights_prefix": "rsna-ich-weights", "wheels_slug": "rsna-ich-wheels",
                      "collect_weights": "lib.kaggle.bundle:collect_weights", "half": ["cnn_"]}},
    description="per-slice 6-label hemorrhage detection on head CT; weighted multi-label log loss (any = 2)",
)

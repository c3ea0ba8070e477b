"""Submission writing: clip, validate against the sample submission, write atomically or not at all."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.tasks.ich.labels import SUBTYPES
from lib.tasks.ich.submission import SubmissionError, fill_missing, to_long, validate_submission, write_submission

IDS = [f"ID_{i:09x}" for i in range(5)]


@pytest.fixture()
def sample(tmp_path: Path) -> Path:
    ids = [f"{i}_{s}" for i in IDS for s in SUBTYPES]
    path = tmp_path / "stage_2_sample_submission.csv"
    pd.DataFrame({"ID": ids[::-1], "Label": 0.5}).to_csv(path, index=False)  # order differs from ours
    return path


def preds(ids=IDS, seed: int = 0) -> pd.DataFrame:
    vals = np.random.default_rng(seed).random((len(ids), 6))
    vals[0, 0], vals[-1, 1] = 0.0, 1.0  # must be clipped
    return pd.DataFrame(vals, index=pd.Index(ids, name="image_id"), columns=list(SUBTYPES))


def test_good_submission_is_clipped_ordered_and_valid(tmp_path: Path, sample: Path):
    out = write_submission(preds(), tmp_path / "submission.csv", sample)
    sub = pd.read_csv(out)
    assert list(sub.columns) == ["ID", "Label"]
    assert sub["ID"].tolist() == pd.read_csv(sample)["ID"].tolist()
    assert sub["Label"].min() == pytest.approx(1e-6) and sub["Label"].max() == pytest.approx(1 - 1e-6)
    validate_submission(sub, sample)
    long = to_long(preds()).set_index("ID")["Label"]
    mid = sub.set_index("ID")["Label"].between(0.01, 0.99)
    np.testing.assert_allclose(sub.set_index("ID")["Label"][mid], long.reindex(sub["ID"])[mid.to_numpy()])


@pytest.mark.parametrize("case,match", [
    ("missing", r"6 IDs missing \(1 images"), ("extra", r"6 IDs extra \(1 images"), ("nan", "NaN"),
    ("dup_image", "duplicated"), ("inf", "NaN or infinite"), ("neg_inf", "NaN or infinite"),
])
def test_invalid_predictions_raise_and_write_nothing(tmp_path: Path, sample: Path, case: str, match: str):
    p = preds()
    if case == "missing":
        p = p.iloc[1:]
    elif case == "extra":
        p = pd.concat([p, preds(["ID_ffffffff0"], seed=1)])
    elif case == "nan":
        p.iloc[2, 3] = np.nan
    elif case in ("inf", "neg_inf"):  # clipping used to turn inf into 1 - 1e-6 without a word
        p.iloc[2, 3] = np.inf if case == "inf" else -np.inf
    else:
        p = pd.concat([p, p.iloc[[1]]])
    target = tmp_path / "submission.csv"
    with pytest.raises(SubmissionError, match=match):
        write_submission(p, target, sample)
    assert not target.exists() and not list(tmp_path.glob(".submission.csv*"))


def test_failed_write_keeps_previous_file(tmp_path: Path, sample: Path):
    target = tmp_path / "submission.csv"
    target.write_text("previous\n")
    bad = preds()
    bad.iloc[0, 0] = np.nan
    with pytest.raises(SubmissionError):
        write_submission(bad, target, sample)
    assert target.read_text() == "previous\n"


def test_validate_long_table_checks(sample: Path):
    good = to_long(preds()).assign(Label=lambda d: d["Label"].clip(1e-6, 1 - 1e-6))
    validate_submission(good, pd.read_csv(sample))
    with pytest.raises(SubmissionError, match="duplicated ID rows"):
        validate_submission(pd.concat([good, good.iloc[[3]]]), sample)
    with pytest.raises(SubmissionError, match="exactly 6 rows"):
        validate_submission(good.iloc[1:], sample)
    with pytest.raises(SubmissionError, match="outside"):
        validate_submission(good.assign(Label=0.0), sample)
    with pytest.raises(SubmissionError, match="lacks columns"):
        validate_submission(good.rename(columns={"Label": "label"}), sample)
    other = pd.DataFrame({"ID": [f"ID_aaaaaaaa0_{s}" for s in SUBTYPES], "Label": 0.5})
    with pytest.raises(SubmissionError, match=r"6 IDs missing \(1 images.*6 IDs extra"):
        validate_submission(pd.concat([good, other]).iloc[6:], sample)


def test_out_of_range_predictions_are_clipped_with_a_warning(tmp_path: Path, sample: Path):
    p = preds()
    p.iloc[1, 2], p.iloc[3, 4] = 1.7, -0.3
    with pytest.warns(UserWarning, match=r"2 predictions lie outside \[0, 1\]"):
        out = write_submission(p, tmp_path / "submission.csv", sample)
    assert pd.read_csv(out)["Label"].between(1e-6, 1 - 1e-6).all()


def test_images_without_a_prediction_get_the_prior_and_are_counted(tmp_path: Path, sample: Path):
    p = preds().iloc[2:]  # two unreadable test images
    prior = pd.Series(np.linspace(0.01, 0.06, 6), index=list(SUBTYPES))
    filled, n = fill_missing(p, sample, prior)
    assert n == 2 and set(filled.index) == set(IDS)
    np.testing.assert_allclose(filled.loc[IDS[0]].to_numpy(), prior.to_numpy())
    write_submission(filled, tmp_path / "submission.csv", sample)  # now a valid submission
    assert fill_missing(filled, sample, prior)[1] == 0


def test_one_unreadable_list_and_cache_rejects_leave_training(tmp_path: Path):
    """A labelled file that passed the header pass but whose pixels the cache rejected used to crash training with
    "image ... is not in cache": it now leaves the index that folds and training read, and is listed once."""
    from lib.paths import RunPaths
    from lib.tasks.ich import pipeline

    rp = RunPaths.at(tmp_path / "run")
    pd.DataFrame({"path": ["/d/ID_bad0.dcm"], "reason": ["not DICOM"]}).to_csv(rp.bad_files("train"), index=False)
    cache = tmp_path / "run" / "cache" / "k"
    cache.mkdir(parents=True)
    pd.DataFrame({"image_id": ["ID_b"], "path": ["/d/ID_b.dcm"], "reason": ["DicomError: pixel data too long"]}
                 ).to_csv(cache / "bad.csv", index=False)
    index = pd.DataFrame({"image_id": ["ID_a", "ID_b", "ID_c"], "path": ["a", "b", "c"]})
    assert pipeline.usable_index(index, rp, cache)["image_id"].tolist() == ["ID_a", "ID_c"]
    bad = pipeline.unreadable(rp, cache)
    assert bad["stage"].tolist() == ["index", "cache"] and bad["image_id"].iloc[1] == "ID_b"

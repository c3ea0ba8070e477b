"""Hostile and careless input: IDs from headers and CSVs never become paths outside their folder, and a changed
or repaired file is read again (the header index and the image cache are keyed by each file's identity)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.imaging.windowing import build_cache, load_cached
from lib.io import dicom_index
from lib.io.ids import BadIdError, check_ids, child_path, id_problem
from lib.tasks import get_task
from lib.tasks.ich.labels import LabelsError, read_labels
from tests.test_dicom import tiny, write_ct

ICH = get_task("ich").id_pattern


# ---------------------------------------------------------------- the ID rules
@pytest.mark.parametrize("value", ["../../../../pwned", "/etc/passwd", "ID_sub/dir/x", "ID_a\\b", "ID_a\x00b",
                                   "..", ".hidden", "", "ID_" + "a" * 200, "ID_a..b"])
def test_unsafe_ids_are_refused_without_a_pattern(value):
    assert id_problem(value) is not None


@pytest.mark.parametrize("value", ["ID_0002a38ad", "1.2.826.0.1.3680043.20574", "00012", "CQ500-CT-0",
                                   "dccc9599087131742838cc1162a630fea87ba9bf61ac09bfda90d4adfa5ddaed"])
def test_the_real_data_ids_are_safe(value):
    assert id_problem(value) is None


def test_task_pattern_and_check_ids_name_the_source():
    assert id_problem("ID_07c9bea25", ICH) is None
    assert "pattern" in id_problem("1.2.3", ICH)
    with pytest.raises(BadIdError, match=r"labels.csv: 2 invalid image IDs.*\.\./x"):
        check_ids(["ID_ab", "../x", "ID_zz"], ICH, "image ID", "labels.csv")


def test_child_path_stays_inside(tmp_path: Path):
    assert child_path(tmp_path, "ID_ab", ".png") == tmp_path / "ID_ab.png"
    for name in ("../x", "a/b", "/abs", "..", ""):
        with pytest.raises(BadIdError, match="outside"):
            child_path(tmp_path, name, "" if name in ("..", "") else ".png")
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(BadIdError):
        child_path(tmp_path / "link", "..", "")


# ---------------------------------------------------------------- header IDs
def test_header_ids_with_paths_go_to_the_bad_table(tmp_path: Path):
    d = tmp_path / "dcm"
    write_ct(d / "good.dcm", tiny(), sop="ID_0a1")
    write_ct(d / "up.dcm", tiny(), sop="../../../../pwned", ipp=(0, 0, 1))
    write_ct(d / "abs.dcm", tiny(), sop="/tmp/pwned", ipp=(0, 0, 2))
    write_ct(d / "sub.dcm", tiny(), sop="ID_sub/dir/x", ipp=(0, 0, 3))
    write_ct(d / "series.dcm", tiny(), sop="ID_0a2", series="ID_s/../../x", ipp=(0, 0, 4))
    df = dicom_index.index(d, out=tmp_path / "index" / "train.parquet", workers=1, progress=False)
    assert df["image_id"].tolist() == ["ID_0a1"]
    bad = dicom_index.bad_files_table(df).set_index("path")["reason"]
    assert len(bad) == 4
    assert "SOPInstanceUID '../../../../pwned' is not a safe ID" in bad[str(d / "up.dcm")]
    assert "SeriesInstanceUID" in bad[str(d / "series.dcm")]
    csv = pd.read_csv(tmp_path / "index" / "bad_files_train.csv")
    assert sorted(csv["path"]) == sorted(bad.index)


def test_task_pattern_applies_to_header_ids(tmp_path: Path):
    d = tmp_path / "dcm"
    hexed = dict(series="ID_5e1", patient="ID_0f1", study="ID_5d1")
    write_ct(d / "a.dcm", tiny(), sop="ID_0a1", **hexed)
    write_ct(d / "b.dcm", tiny(), sop="1.2.3.4", ipp=(0, 0, 1), **hexed)
    assert len(dicom_index.index(d, workers=1, progress=False)) == 2  # safe, and no pattern asked for
    df = dicom_index.index(d, workers=1, progress=False, id_pattern=ICH)
    assert df["image_id"].tolist() == ["ID_0a1"]
    assert "does not match the task's ID pattern" in dicom_index.bad_files_table(df)["reason"].iloc[0]


def test_cache_never_writes_outside_its_folder(tmp_path: Path):
    src = write_ct(tmp_path / "x.dcm", tiny(0, shape=(16, 16)), sop="ID_01")
    res = build_cache([("../../pwned", src), ("ID_sub/dir/x", src), ("ID_01", src)], tmp_path / "run" / "cache",
                      img_size=16, workers=1, progress=False)
    assert (res.written, res.bad) == (1, 2)
    assert not list(tmp_path.rglob("pwned*")) and not (res.dir / "ID_sub").exists()
    bad = pd.read_csv(res.dir / "bad.csv")
    assert bad["reason"].str.contains("BadIdError").all()
    with pytest.raises(BadIdError):
        load_cached(res.dir, "../../pwned")


# ---------------------------------------------------------------- CSV IDs
def test_label_csv_ids_are_checked(tmp_path: Path):
    rows = [f"ID_../../x_{s},0" for s in ("epidural", "intraparenchymal", "intraventricular", "subarachnoid",
                                            "subdural", "any")]
    (tmp_path / "l.csv").write_text("ID,Label\n" + "\n".join(rows) + "\n")
    with pytest.raises(LabelsError, match="not a safe ID"):
        read_labels(tmp_path / "l.csv")


# ---------------------------------------------------------------- identity: a changed file is read again
def _touch_later(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


def test_index_rereads_a_repaired_file_and_reuses_the_rest(tmp_path: Path, monkeypatch):
    d, out = tmp_path / "dcm", tmp_path / "index" / "train.parquet"
    for k in range(3):
        write_ct(d / f"{k}.dcm", tiny(), sop=f"ID_0{k}", ipp=(0, 0, k))
    broken = d / "2.dcm"
    good_bytes = broken.read_bytes()
    broken.write_bytes(good_bytes[:-10])  # truncated
    first = dicom_index.index(d, out=out, workers=1, progress=False, reuse=True)
    assert len(first) == 2 and len(dicom_index.bad_files_table(first)) == 1
    broken.write_bytes(good_bytes)  # repaired: same name, same file count, new content
    _touch_later(broken)
    seen = []
    real = dicom_index.header_record
    monkeypatch.setattr(dicom_index, "header_record", lambda p: seen.append(p) or real(p))
    second = dicom_index.index(d, out=out, workers=1, progress=False, reuse=True)
    assert seen == [str(broken)]  # only the changed file is read
    assert sorted(second["image_id"]) == ["ID_00", "ID_01", "ID_02"] and not len(dicom_index.bad_files_table(second))
    seen.clear()
    third = dicom_index.index(d, out=out, workers=1, progress=False, reuse=True)
    assert seen == [] and third.drop(columns=[]).equals(second)


def test_cache_rerenders_a_changed_source(tmp_path: Path):
    src = write_ct(tmp_path / "a.dcm", tiny(0, shape=(16, 16)), sop="ID_01")
    first = build_cache([("ID_01", src)], tmp_path / "cache", img_size=16, crop=False, workers=1, progress=False)
    before = load_cached(first.dir, "ID_01").copy()
    write_ct(src, tiny(1024 + 80, shape=(16, 16)), sop="ID_01")  # same name, brighter image
    _touch_later(src)
    second = build_cache([("ID_01", src)], tmp_path / "cache", img_size=16, crop=False, workers=1, progress=False)
    assert (second.written, second.skipped) == (1, 0)
    assert not np.array_equal(load_cached(second.dir, "ID_01"), before)
    third = build_cache([("ID_01", src)], tmp_path / "cache", img_size=16, crop=False, workers=1, progress=False)
    assert (third.written, third.skipped) == (0, 1)

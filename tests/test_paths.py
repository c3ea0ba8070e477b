"""RunPaths names the artefacts the stages find each other by."""
from pathlib import Path

import pytest

from lib.paths import RunPaths, embedding_files


def test_run_paths_names(tmp_path: Path):
    rp = RunPaths.at(tmp_path / "run")
    root = rp.root
    assert rp.index("test") == root / "index" / "test.parquet"
    assert rp.embedding("oof", 2) == root / "embeddings" / "oof_fold2"
    assert rp.embedding("test", -1, "_ep3") == root / "embeddings" / "test_all_ep3"
    assert rp.embedding_logits("oof", 0) == root / "embeddings" / "oof_fold0_logits.npy"
    assert rp.embedding_record("test", 1) == root / "embeddings" / "test_fold1.json"
    assert rp.oof_predictions("cnn") == root / "predictions" / "oof_cnn.csv"
    assert rp.test_predictions("seq_pooled") == root / "predictions" / "test_seq_pooled.csv"
    assert {k: p.name for k, p in embedding_files(rp.embedding("oof", 0)).items()} == {
        "embeddings": "oof_fold0.npy", "logits": "oof_fold0_logits.npy", "index": "oof_fold0.parquet",
        "record": "oof_fold0.json"}
    with pytest.raises(ValueError, match="'oof' or 'test'"):
        rp.embedding("valid", 0)

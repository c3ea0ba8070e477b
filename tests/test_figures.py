"""What a person looks at: figures saved as files, inline images in executed notebooks, the HTML report, progress
bars, and the run-comparison table."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nbformat  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from lib.evaluate import plots
from lib import progress
from lib.evaluate import report
from lib.run import runner as run  # noqa: E402
from lib.evaluate.html import write_html_report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_save_writes_a_png_with_the_usual_mode_and_refuses_path_like_names(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = plots.save(fig, tmp_path / "figures", "learning_curves_fold0")
    plt.close(fig)
    assert path == tmp_path / "figures" / "learning_curves_fold0.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    for bad in ("../x", "a/b", "", ".hidden", "a..b"):
        with pytest.raises(ValueError, match="figure name"):
            plots.save(fig, tmp_path, bad)


def test_series_strip_draws_every_model_and_the_label():
    imgs = [np.full((8, 8), i * 20, np.uint8) for i in range(5)]
    fig = plots.series_strip(imgs, probs={"cnn": np.linspace(0, 1, 5), "seq": np.linspace(1, 0, 5)},
                             truth=np.array([0, 1, 1, 0, 0]), label="any", title="series X")
    strip = fig.axes[-1]
    assert [t.get_text() for t in strip.get_legend().get_texts()] == ["cnn P(any)", "seq P(any)", "label any"]
    assert strip.get_xlabel().startswith("slice")
    plt.close(fig)


def test_learning_curves_split_per_class_columns_and_mark_the_best_epoch():
    log = pd.DataFrame({"epoch": [0, 1, 2], "train_loss": [0.5, 0.4, 0.3], "valid_loss": [0.5, 0.45, 0.47],
                        "logloss": [0.5, 0.45, 0.47], "logloss_any": [0.6, 0.5, 0.55], "time": ["0:01"] * 3})
    fig = plots.learning_curves(log, title="resnet18 fold 0", best_epoch=1)
    left, right = fig.axes
    assert {t.get_text() for t in left.get_legend().get_texts()} == {"train_loss", "valid_loss", "logloss",
                                                                     "best epoch 1"}
    assert "any" in {t.get_text() for t in right.get_legend().get_texts()}
    plt.close(fig)


def test_progress_bar_is_text_outside_a_notebook_and_the_mode_is_validated(monkeypatch, capsys):
    monkeypatch.delenv(progress.ENV, raising=False)
    assert progress.mode() == "text"
    with progress.progress_bar(total=3, desc="unit") as bar:
        bar.update(3)
    assert "unit" in capsys.readouterr().err
    monkeypatch.setenv(progress.ENV, "widgets")
    with pytest.raises(ValueError, match="LIB_PROGRESS"):
        progress.mode()


def test_kernel_env_pins_inline_figures_over_an_agg_parent_and_restores_it(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("LIB_PROGRESS", raising=False)
    with run.kernel_env():
        assert os.environ["MPLBACKEND"] == "module://matplotlib_inline.backend_inline"
        assert os.environ["LIB_PROGRESS"] == "text"
    assert os.environ["MPLBACKEND"] == "Agg" and "LIB_PROGRESS" not in os.environ


def test_html_report_embeds_the_notebooks_images(tmp_path):
    nb = nbformat.v4.new_notebook()
    png = __import__("base64").b64encode(b"\x89PNG\r\n\x1a\n" + b"0" * 16).decode()
    cell = nbformat.v4.new_code_cell("plot()", outputs=[nbformat.v4.new_output(
        "display_data", data={"image/png": png, "text/plain": "<Figure>"})])
    nb.cells = [nbformat.v4.new_markdown_cell("# Report"), cell]
    path = tmp_path / "06_report.ipynb"
    nbformat.write(nb, str(path))
    html = write_html_report(path, tmp_path / "report.html").read_text()
    assert f"data:image/png;base64,{png}" in html and "Report" in html
    assert "plot()" not in html  # code hidden in the report; the executed notebook keeps it


def _fake_run(root: Path, name: str, arch: str, cnn: float, test: float = None) -> Path:
    root.mkdir(parents=True)
    stages = [{"stage": "windowing", "notebook": "notebooks/01_windowing.ipynb", "params": {}, "status": "ok",
               "seconds": 30.0},
              {"stage": "train_cnn", "notebook": "notebooks/02_train_cnn_fold0.ipynb", "status": "ok",
               "params": {"arch": arch, "img_size": 64, "fold": 0}, "seconds": 90.0}]
    (root / "manifest.json").write_text(json.dumps({"run": name, "git_commit": "0123456789abcdef-dirty",
                                                    "stages": stages}))
    metrics = {"oof_cnn_logloss": cnn, "oof_prior_logloss": 0.33}
    if test is not None:
        metrics["test_submission_logloss"] = test
    (root / "metrics.json").write_text(json.dumps(metrics))
    return root


def test_compare_table_has_one_row_per_run_with_settings_figures_and_commit(tmp_path, capsys):
    a = _fake_run(tmp_path / "a", "demo", "resnet10t", 0.18, test=0.11)
    _fake_run(tmp_path / "b", "other", "convnext_atto", 0.25)
    table = report.compare_runs([a, tmp_path / "b"])
    assert list(table.index) == ["demo", "other"]
    assert table.loc["demo", "backbone"] == "resnet10t" and table.loc["other", "backbone"] == "convnext_atto"
    assert table.loc["demo", "windows"] == "brain_subdural_soft"  # the notebook's default, not its source text
    assert table.loc["demo", "oof_cnn"] == 0.18 and pd.isna(table.loc["other", "test"])
    assert table.loc["demo", "wall_min"] == 2.0 and table.loc["demo", "commit"] == "012345678-dirty"
    assert "oof_seq" not in table  # no run has it
    assert report.main(["--compare", str(tmp_path / "*"), "--markdown"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| run | task | backbone") and len(out) == 4
    assert report.main(["--compare", str(tmp_path / "nothing*")]) == 2


def _image_outputs(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def _plotting_cells(nb_path: Path):
    nb = nbformat.read(str(nb_path), as_version=4)
    return [c for c in nb.cells if c.cell_type == "code" and "plots.save(" in c.source]


#: figures the smoke run must leave under figures/ (named by content)
SMOKE_FIGURES = {"eda_prevalence", "eda_cooccurrence", "eda_series_spacing_tilt", "eda_hu_histograms",
                 "eda_series_strip_brain", "eda_subtype_examples", "windowing_named_windows",
                 "learning_curves_cnn_fold0", "learning_curves_cnn_fold1", "oof_roc_pr", "oof_calibration",
                 "oof_series_strip_0"}


def check_run_figures(out: Path) -> None:
    """The executed notebooks carry their figures, report.html embeds them, figures/ holds the PNGs, and no
    notebook printed a progress-bar or deprecation warning. Called by the smoke test in test_pipeline."""
    for name in ("00_eda", "01_windowing", "02_train_cnn_fold0", "06_report"):
        cells = _plotting_cells(out / "notebooks" / f"{name}.ipynb")
        assert cells, f"{name}: no plotting cell found"
        for cell in cells:
            assert _image_outputs(cell) >= 1, f"{name}: plotting cell without an image:\n{cell.source}"
    html = (out / "report.html").read_text()
    n_report_images = sum(_image_outputs(c) for c in _plotting_cells(out / "notebooks" / "06_report.ipynb"))
    assert html.count("data:image/png;base64,") >= n_report_images >= 3
    assert SMOKE_FIGURES <= {p.stem for p in (out / "figures").glob("*.png")}
    for nb_path in (out / "notebooks").glob("*.ipynb"):
        text = nb_path.read_text()
        for bad in ("IProgress not found", "TqdmWarning", "FutureWarning"):
            assert bad not in text, f"{nb_path.name} printed {bad!r}"

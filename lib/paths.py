"""Every path in one place: the competition data folder, a run's artefact layout, and Kaggle kernel detection.

Notebooks never invent paths: they receive `data_dir` and `run_dir` from the runner and ask this module.
Downstream stages find upstream artefacts through `RunPaths.lookup(name)`, never by globbing.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

PathLike = Union[str, Path]

def on_kaggle() -> bool:
    """True inside a Kaggle kernel (Kaggle sets KAGGLE_KERNEL_RUN_TYPE)."""
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE"))


def kaggle_input_root() -> Path:
    """Root of attached datasets: /kaggle/input, or $KAGGLE_INPUT_ROOT (used by the offline-kernel test)."""
    return Path(os.environ.get("KAGGLE_INPUT_ROOT", "/kaggle/input"))


def kaggle_working_dir() -> Path:
    """Writable working directory of a Kaggle kernel, or $KAGGLE_WORKING_DIR."""
    return Path(os.environ.get("KAGGLE_WORKING_DIR", "/kaggle/working"))


def attached_dataset(slug: str) -> Path:
    """Folder of an attached Kaggle dataset `slug` (`owner/name` or `name`) under the input root.

    Kaggle mounts datasets as `<root>/<name>` (classic) or `<root>/datasets/<owner>/<name>` (newer kernels).
    """
    root, name = kaggle_input_root(), slug.split("/")[-1]
    candidates = ([root / "datasets" / slug] if "/" in slug else []) + [root / name]
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(f"dataset {slug!r} is not attached: none of {[str(c) for c in candidates]} exists")


def competition_dir(competition: str, marker: str, root: Optional[Path] = None) -> Path:
    """A competition's data folder on Kaggle: the first of the known mount layouts under the input root that holds
    `marker` (a file or folder every download of that competition has, e.g. `stage_2_test`)."""
    root = root or kaggle_input_root()
    candidates = [root / "competitions" / competition / competition, root / "competitions" / competition,
                  root / competition / competition, root / competition]
    for path in candidates:
        if (path / marker).exists():
            return path
    raise FileNotFoundError(f"competition data not found; looked for {marker} in {[str(c) for c in candidates]}")


def resolve_data_dir(data_dir: Optional[PathLike], competition: str, marker: str) -> Path:
    """The competition data folder: the given one, else the attached competition on Kaggle."""
    if data_dir:
        return Path(data_dir).expanduser().resolve()
    if on_kaggle():
        return competition_dir(competition, marker)
    raise ValueError(f"data_dir is empty: pass the folder holding the {competition} download")


@functools.lru_cache(maxsize=1)
def _file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file: 0o666 less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: PathLike, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` to a temp file beside `path`, then rename it over `path`: readers (and a resumed run) never see
    a half-written file, and a failed or killed write leaves the old one in place. The folder must exist."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600; the result gets the mode its siblings get (0644 usually)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_npy(path: PathLike, array: Any) -> None:
    """`np.save` through `atomic_write` (to an open file: given a name without .npy, np.save would append one)."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
    atomic_write(path, write)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write text via a temp file + rename (creating the folder), so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(text))


#: the files of one embedding export, by role, as suffixes of its prefix (lib.train.embed writes them)
EMBEDDING_FILES = {"embeddings": ".npy", "logits": "_logits.npy", "index": ".parquet", "record": ".json"}


def embedding_files(prefix: PathLike) -> Dict[str, Path]:
    """{role: path} of the export at `prefix` (e.g. RUN/embeddings/oof_fold0): embeddings, logits, index, record."""
    prefix = Path(prefix)
    return {role: prefix.with_name(prefix.name + suffix) for role, suffix in EMBEDDING_FILES.items()}


@dataclass(frozen=True)
class RunPaths:
    """A run directory's layout. Everything a stage writes goes under `root`."""

    root: Path

    @classmethod
    def at(cls, run_dir: PathLike) -> "RunPaths":
        if not run_dir:
            raise ValueError("run_dir is empty: the runner passes the run directory to every stage")
        root = Path(run_dir).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    def _dir(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- stage artefacts -------------------------------------------------------------------------------------
    def index(self, split: str) -> Path:
        """Header index parquet of a split ('train' / 'test')."""
        return self._dir("index") / f"{split}.parquet"

    def bad_files(self, split: str) -> Path:
        return self._dir("index") / f"bad_files_{split}.csv"

    @property
    def cache_root(self) -> Path:
        return self._dir("cache")

    @property
    def folds(self) -> Path:
        return self.root / "folds.csv"

    def model_dir(self, fold: int, name: str = "cnn") -> Path:
        """Checkpoints and logs of one fold's model (`fold=-1`: trained on everything -> `all`)."""
        return self._dir("models", name, "all" if int(fold) < 0 else f"fold{int(fold)}")

    @property
    def embeddings_dir(self) -> Path:
        return self._dir("embeddings")

    def embedding(self, split: str, fold: int, suffix: str = "") -> Path:
        """Prefix of fold model `fold`'s export of `split` ('oof' / 'test'; fold -1 -> `all`), e.g. oof_fold0_ep3."""
        if split not in ("oof", "test"):
            raise ValueError(f"embedding split must be 'oof' or 'test', got {split!r}")
        return self.embeddings_dir / f"{split}_{'all' if int(fold) < 0 else f'fold{int(fold)}'}{suffix}"

    def embedding_logits(self, split: str, fold: int, suffix: str = "") -> Path:
        """The export's logits file, float16 (N, 6): `<prefix>_logits.npy`."""
        return embedding_files(self.embedding(split, fold, suffix))["logits"]

    def embedding_record(self, split: str, fold: int, suffix: str = "") -> Path:
        """The export's own record (TTA views, checkpoint, image size): `<prefix>.json`."""
        return embedding_files(self.embedding(split, fold, suffix))["record"]

    @property
    def predictions_dir(self) -> Path:
        return self._dir("predictions")

    def oof_predictions(self, name: str) -> Path:
        """Wide OOF predictions of `name` (cnn, seq, seq_pooled, ensemble, ...): predictions/oof_{name}.csv."""
        return self.predictions_dir / f"oof_{name}.csv"

    def test_predictions(self, name: str) -> Path:
        """Kaggle-long test predictions of `name`: predictions/test_{name}.csv."""
        return self.predictions_dir / f"test_{name}.csv"

    @property
    def figures_dir(self) -> Path:
        return self._dir("figures")

    @property
    def submission(self) -> Path:
        return self.root / "submission.csv"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.json"

    # -- artefact registry: how downstream stages find upstream outputs ----------------------------------------
    @property
    def _artefacts_path(self) -> Path:
        return self.root / "artefacts.json"

    def record(self, name: str, path: PathLike) -> None:
        """Record artefact `name` (stored relative to the run dir when inside it)."""
        reg = self._read_json(self._artefacts_path)
        path = Path(path).resolve()
        reg[name] = str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)
        atomic_write_text(self._artefacts_path, json.dumps(reg, indent=2, sort_keys=True))

    def lookup(self, name: str) -> Path:
        """Path of artefact `name` recorded by an upstream stage; a clear error if that stage has not run."""
        reg = self._read_json(self._artefacts_path)
        if name not in reg:
            raise FileNotFoundError(f"artefact {name!r} not recorded in {self._artefacts_path}; "
                                    f"known: {sorted(reg)} (run the stage that produces it first)")
        path = Path(reg[name])
        return path if path.is_absolute() else self.root / path

    # -- metrics.json --------------------------------------------------------------------------------------
    def update_metrics(self, values: Dict[str, Any]) -> Dict[str, Any]:
        """Merge `values` into metrics.json (atomic) and return the merged dict."""
        merged = self._read_json(self.metrics_path)
        merged.update(values)
        atomic_write_text(self.metrics_path, json.dumps(merged, indent=2, sort_keys=True))
        return merged

    def metrics(self) -> Dict[str, Any]:
        return self._read_json(self.metrics_path)

    @staticmethod
    def _read_json(path: Path) -> Dict[str, Any]:
        return json.loads(path.read_text()) if path.exists() else {}

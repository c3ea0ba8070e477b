"""Kaggle packaging: the offline inference kernel and the three datasets it attaches (code, weights, wheels).

    python -m lib.kaggle package-code [--out DIR] [--slug rsna-ich-code]
    python -m lib.kaggle package-weights RUN [--out DIR] [--slug rsna-ich-weights-<run>]
    python -m lib.kaggle package-wheels [--out DIR] [--packages P ...] [--python 3.11] [--platform TAG ...]
                                        [--find-links DIR] [--dry-run]
    python -m lib.kaggle build-kernel --run RUN --slug SLUG [--title T] [--gpu/--no-gpu] [--private/--public]
    python -m lib.kaggle validate DIR ...      # check metadata files the way the kaggle CLI reads them

Kernels are generated from notebooks/07_inference.ipynb by `papermill --prepare-only` (parameters baked in) and
never edited by hand; `kernel-metadata.json` always says `enable_internet: false`. Outputs default to
kernels/<slug>/ (kernels) and kernels/datasets/<slug>/ (datasets), both git-ignored. RUN is a run directory or a run
name under outputs/. The Kaggle user comes from --user, else $KAGGLE_USERNAME, else a placeholder
(`lib.kaggle_meta.USER_PLACEHOLDER`; rebuild with --user before pushing). Nothing here talks to Kaggle: pushing is
the kaggle CLI's job (kernels/README.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from lib.tasks import get_task
from lib.kaggle.meta import (LICENSE, dataset_metadata, kaggle_user, kernel_metadata, slugify, validate_dataset_folder,
                          validate_kernel_folder)
from lib.paths import PathLike, atomic_write_text

REPO = Path(__file__).resolve().parents[2]
KERNELS = REPO / "kernels"
NOTEBOOK = REPO / "notebooks" / "ich" / "07_inference.ipynb"  # the ICH kernel source (lib.tasks.ich.spec)
CODE_SLUG, WHEELS_SLUG = "rsna-ich-code", "rsna-ich-wheels"
#: What the Kaggle Python image lacks for this pipeline (it ships torch, timm, fastai, pydicom, albumentations,
#: opencv): the pylibjpeg decoders for JPEG-compressed DICOMs. Pins follow requirements.txt. Override with --packages.
KAGGLE_MISSING = ("pylibjpeg>=2.0,<3", "pylibjpeg-libjpeg>=2.3,<3", "pylibjpeg-openjpeg>=2.4,<3")
KAGGLE_PYTHON = "3.11"
KAGGLE_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# the whole lib tree (sub-packages included: a flat lib/*.py glob silently dropped them) and every task's params
CODE_FILES = ("lib/**/*.py", "params/**/*.yaml", "requirements.txt")


# ---------------------------------------------------------------- names and sizes
def weights_slug(run_name: str) -> str:
    return slugify(f"rsna-ich-weights-{run_name}")[:50].strip("-")


def resolve_run(run: PathLike) -> Path:
    """A run directory, or a run name under outputs/; FileNotFoundError when neither exists."""
    for cand in (Path(run).expanduser(), REPO / "outputs" / str(run)):
        if cand.is_dir():
            return cand.resolve()
    raise FileNotFoundError(f"run {run!r} is neither a directory nor a run under {REPO / 'outputs'}")


def folder_size(path: PathLike) -> int:
    """Total bytes of the files under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fresh_dir(path: Path) -> Path:
    """An empty folder at `path`; a previous package there (it has a *-metadata.json) is replaced, anything else
    non-empty is an error (never delete a folder this module did not write)."""
    if path.exists() and any(path.iterdir()):
        if not any((path / f).is_file() for f in ("dataset-metadata.json", "kernel-metadata.json")):
            raise FileExistsError(f"{path} is not empty and holds no package written by lib.kaggle; "
                                  "choose another --out")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _finish_dataset(folder: Path, slug: str, user: Optional[str], license_name: str, description: str,
                    manifest: Dict[str, Any]) -> Path:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    manifest["files"] = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
                         for p in files}
    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=2, default=str))
    meta = dataset_metadata(slug, user=user, license_name=license_name, description=description)
    atomic_write_text(folder / "dataset-metadata.json", json.dumps(meta, indent=2))
    validate_dataset_folder(folder)
    return folder


def package_code(out: Optional[PathLike] = None, slug: str = CODE_SLUG, user: Optional[str] = None,
                 license_name: str = LICENSE) -> Path:
    """Copy the `lib` package (+ params/, requirements.txt) into `out` (default kernels/datasets/<slug>).

    The kernel bootstrap puts the dataset folder on sys.path, so `import lib` finds `<dataset>/lib`. Kaggle keeps
    sub-folders only when pushed with `kaggle datasets create -p DIR --dir-mode zip`.
    """
    from lib.run.runner import git_commit

    folder = _fresh_dir(Path(out) if out else KERNELS / "datasets" / slug)
    for pattern in CODE_FILES:
        for src in sorted(REPO.glob(pattern)):
            dst = folder / src.relative_to(REPO)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    if not (folder / "lib" / "__init__.py").is_file():
        raise FileNotFoundError(f"{REPO / 'lib'} holds no package to copy")
    manifest = {"kind": "code", "git_commit": git_commit(), "python": sys.version.split()[0]}
    desc = f"The `lib` package of the RSNA ICH pipeline at commit {manifest['git_commit']} (generated by lib.kaggle)."
    return _finish_dataset(folder, slug, user, license_name, desc, manifest)


def package_weights(run: PathLike, out: Optional[PathLike] = None, slug: Optional[str] = None,
                    user: Optional[str] = None, license_name: str = LICENSE, half: bool = False) -> Path:
    """Copy a run's inference models (`lib.kaggle.bundle.collect_weights`: fold CNN best.pth, sequence heads, blend) into a
    dataset folder with a manifest (architecture, preprocessing, params, folds, OOF metrics, git commit).

    Files are flattened to one level (`cnn_fold0.pth`, ...) so the dataset needs no --dir-mode. `half`: store CNN
    weights as float16 (half the size; `lib.tasks.ich.infer` loads them back as float32).
    """
    from lib.kaggle import bundle

    run_dir = resolve_run(run)
    slug = slug or weights_slug(run_dir.name)
    manifest, files = bundle.collect_weights(run_dir)
    folder = _fresh_dir(Path(out) if out else KERNELS / "datasets" / slug)
    for name, src in files.items():
        bundle.copy_checkpoint(src, folder / name, half=half and name.startswith("cnn_"))
    manifest.update(kind="weights", half=bool(half))
    desc = (f"Inference weights of run {manifest.get('run')!r} (git {manifest.get('git_commit')}); OOF metrics: "
            f"{ {k: v for k, v in manifest.get('metrics', {}).items() if k.endswith('_logloss')} }")
    return _finish_dataset(folder, slug, user, license_name, desc, manifest)


def pip_download_command(dest: PathLike, packages: Sequence[str], python: str = KAGGLE_PYTHON,
                         platforms: Sequence[str] = KAGGLE_PLATFORMS, find_links: Optional[PathLike] = None,
                         deps: bool = False) -> List[str]:
    """`pip download` of binary wheels for the Kaggle interpreter (explicit platform / version tags).

    find_links: a local wheel folder, used instead of PyPI (--no-index): offline builds and tests.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--dest", str(dest), "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "--disable-pip-version-check"]
    for tag in platforms:
        cmd += ["--platform", tag]
    if find_links:
        cmd += ["--no-index", "--find-links", str(find_links)]
    return cmd + ([] if deps else ["--no-deps"]) + list(packages)


def package_wheels(out: Optional[PathLike] = None, slug: str = WHEELS_SLUG, packages: Sequence[str] = KAGGLE_MISSING,
                   python: str = KAGGLE_PYTHON, platforms: Sequence[str] = KAGGLE_PLATFORMS,
                   find_links: Optional[PathLike] = None, deps: bool = False, user: Optional[str] = None,
                   license_name: str = LICENSE, dry_run: bool = False) -> Path:
    """Wheels for what the Kaggle image lacks + requirements.txt (what the kernel installs) in a dataset folder.

    The kernel runs `pip install --no-index --find-links <dataset> -r <dataset>/requirements.txt`. Without `deps`
    only the listed packages are fetched (their dependencies are in the image). dry_run: print the pip command only.
    """
    folder = Path(out) if out else KERNELS / "datasets" / slug
    cmd = pip_download_command(folder, packages, python, platforms, find_links, deps)
    if dry_run:
        print(" ".join(cmd))
        return folder
    _fresh_dir(folder)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download failed for {list(packages)} (python {python}, {list(platforms)}):\n"
                           f"{proc.stderr.strip()[-2000:]}")
    atomic_write_text(folder / "requirements.txt", "".join(f"{p}\n" for p in packages))
    manifest = {"kind": "wheels", "python": python, "platforms": list(platforms), "packages": list(packages),
                "deps": bool(deps), "wheels": sorted(p.name for p in folder.glob("*.whl"))}
    desc = f"Offline wheels for the RSNA ICH kernel (Python {python}): {', '.join(packages)}."
    return _finish_dataset(folder, slug, user, license_name, desc, manifest)


# ---------------------------------------------------------------- kernel
def kernel_parameters(code_ref: str, weights_ref: str, wheels_ref: str, wheels: Sequence[str] = (),
                      extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Parameters baked into the kernel: dataset refs (`owner/slug`, resolved in the kernel through lib.paths) and
    empty data / run dirs (the attached competition and /kaggle/working); never an absolute path."""
    return {"data_dir": "", "run_dir": "", "weights_dir": "", "code_dataset": code_ref, "weights_dataset": weights_ref,
            "wheels_dataset": wheels_ref, "wheels": list(wheels), "cleanup": True, **(extra or {})}


def build_kernel(run: PathLike, slug: str, title: Optional[str] = None, user: Optional[str] = None, gpu: bool = True,
                 private: bool = True, code_slug: str = CODE_SLUG, weights: Optional[str] = None,
                 wheels_slug: str = WHEELS_SLUG, wheels: Sequence[str] = (), out: Optional[PathLike] = None,
                 extra: Optional[Dict[str, Any]] = None, notebook: PathLike = NOTEBOOK) -> Path:
    """kernels/<slug>/: `<slug>.ipynb` (07_inference through papermill prepare-only) + kernel-metadata.json.

    `weights` defaults to the weights slug of `run` (whose weights must then be complete: `collect_weights` runs);
    `wheels` overrides the wheels dataset's requirements.txt; an empty `wheels_slug` attaches no wheels dataset.
    `extra` bakes further notebook parameters (bs, num_workers, ...).
    """
    import papermill as pm

    from lib.kaggle.bundle import collect_weights
    from lib.run.runner import notebook_parameters

    if len(slugify(slug)) < 5 or slugify(slug) != slug:
        raise ValueError(f"kernel slug must be lower-case letters, digits and '-', >= 5 characters; got {slug!r}")
    if not weights:
        collect_weights(resolve_run(run))  # a kernel for a run that could not be packaged would fail on Kaggle
        weights = weights_slug(resolve_run(run).name)
    owner = kaggle_user(user)
    refs = [d if not d or "/" in d else f"{owner}/{d}" for d in (code_slug, weights, wheels_slug)]
    params = kernel_parameters(*refs, wheels=wheels, extra=extra)
    declared = notebook_parameters(Path(notebook))
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ValueError(f"parameters {unknown} are not declared by {notebook}; valid: {sorted(declared)}")
    folder = _fresh_dir(Path(out) if out else KERNELS / slug)
    code_file = f"{slug}.ipynb"
    pm.execute_notebook(str(notebook), str(folder / code_file), parameters=params, prepare_only=True,
                        kernel_name="python3", progress_bar=False)
    meta = kernel_metadata(slug, code_file, [r for r in refs if r], get_task("ich").competition, title=title,
                           user=user, gpu=gpu, private=private)
    atomic_write_text(folder / "kernel-metadata.json", json.dumps(meta, indent=2))
    for w in validate_kernel_folder(folder):
        print(f"warning: {w}", file=sys.stderr)
    return folder


# ---------------------------------------------------------------- CLI
def _common(p: argparse.ArgumentParser, slug: Optional[str]) -> None:
    p.add_argument("--out", type=Path, default=None, help="output folder (default kernels/datasets/<slug>)")
    p.add_argument("--slug", default=slug, help=f"dataset slug (default {slug or 'from the run name'})")
    p.add_argument("--user", default=None, help="Kaggle user (default $KAGGLE_USERNAME or a placeholder)")
    p.add_argument("--license", default=LICENSE, help=f"Kaggle license name (default {LICENSE!r})")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lib.kaggle", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    _common(sub.add_parser("package-code", help="the lib package as a dataset"), CODE_SLUG)
    p = sub.add_parser("package-weights", help="a run's inference weights + manifest as a dataset")
    p.add_argument("run", help="run directory or run name under outputs/")
    p.add_argument("--half", action="store_true", help="store CNN weights as float16")
    _common(p, None)
    p = sub.add_parser("package-wheels", help="offline wheels for what the Kaggle image lacks")
    _common(p, WHEELS_SLUG)
    p.add_argument("--packages", nargs="+", default=list(KAGGLE_MISSING), help="requirements to fetch")
    p.add_argument("--python", default=KAGGLE_PYTHON, help="Kaggle's Python version (X.Y)")
    p.add_argument("--platform", nargs="+", default=list(KAGGLE_PLATFORMS), dest="platforms", help="wheel tags")
    p.add_argument("--find-links", type=Path, default=None, help="local wheel folder instead of PyPI")
    p.add_argument("--deps", action="store_true", help="also fetch the packages' dependencies")
    p.add_argument("--dry-run", action="store_true", help="print the pip command only")
    p = sub.add_parser("build-kernel", help="generate kernels/<slug>/ from notebooks/07_inference.ipynb")
    p.add_argument("--run", required=True, help="run directory or run name under outputs/")
    p.add_argument("--slug", required=True, help="kernel slug")
    p.add_argument("--title", default=None, help="kernel title (default: from the slug)")
    p.add_argument("--user", default=None, help="Kaggle user (default $KAGGLE_USERNAME or a placeholder)")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=True, help="enable a GPU")
    p.add_argument("--private", action=argparse.BooleanOptionalAction, default=True, help="private kernel")
    p.add_argument("--code-slug", default=CODE_SLUG)
    p.add_argument("--weights-slug", default=None, help="default rsna-ich-weights-<run>")
    p.add_argument("--wheels-slug", default=WHEELS_SLUG, help="'' attaches no wheels dataset")
    p.add_argument("--wheels", nargs="*", default=[], help="requirements to install (default: the dataset's list)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=JSON", help="bake another parameter")
    p.add_argument("--out", type=Path, default=None, help="output folder (default kernels/<slug>)")
    p = sub.add_parser("validate", help="check kernel-metadata.json / dataset-metadata.json folders")
    p.add_argument("folders", nargs="+", type=Path)
    return ap


def _extra(pairs: Sequence[str]) -> Dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--param expects KEY=VALUE (VALUE as JSON), got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _report(folder: Path) -> None:
    print(f"{folder}  ({folder_size(folder) / 2**20:.2f} MiB)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "package-code":
            _report(package_code(args.out, args.slug, args.user, args.license))
        elif args.cmd == "package-weights":
            _report(package_weights(args.run, args.out, args.slug, args.user, args.license, args.half))
        elif args.cmd == "package-wheels":
            folder = package_wheels(args.out, args.slug, args.packages, args.python, args.platforms,
                                    args.find_links, args.deps, args.user, args.license, args.dry_run)
            if not args.dry_run:
                _report(folder)
        elif args.cmd == "build-kernel":
            _report(build_kernel(args.run, args.slug, args.title, args.user, args.gpu, args.private, args.code_slug,
                                 args.weights_slug, args.wheels_slug, args.wheels, args.out, _extra(args.param)))
        else:
            for folder in args.folders:
                kind = "kernel" if (folder / "kernel-metadata.json").exists() else "dataset"
                warns = (validate_kernel_folder if kind == "kernel" else validate_dataset_folder)(folder)
                print(f"{folder}: {kind} metadata ok" + "".join(f"\n  warning: {w}" for w in warns))
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as exc:  # incl. metadata / bundle errors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

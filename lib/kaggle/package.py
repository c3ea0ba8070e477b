"""Kaggle packaging: the offline inference kernel and the three datasets it attaches (code, weights, wheels).

    python -m lib.kaggle package-code [--task T] [--out DIR] [--slug rsna-ich-code]
    python -m lib.kaggle package-weights RUN [--task T] [--out DIR] [--slug rsna-ich-weights-<run>]
    python -m lib.kaggle package-wheels [--task T] [--out DIR] [--packages P ...] [--python 3.11] [--platform TAG ...]
                                        [--find-links DIR] [--dry-run]
    python -m lib.kaggle build-kernel --run RUN --slug SLUG [--task T] [--title T] [--gpu/--no-gpu]
                                      [--private/--public]
    python -m lib.kaggle validate DIR ...      # check metadata files the way the kaggle CLI reads them

Each task declares its kernel in its spec, `extra["kernel"]` (`KernelSpec`): the notebook under notebooks/<task>/,
the code / weights / wheels slugs, the packages the Kaggle image lacks and the "module:function" that collects a
run's weights. package-weights and build-kernel take the task from the run's manifest.json (`--task` must agree);
package-code and package-wheels from `--task` (default ich). Shared code never imports a task package: the spec's
strings are resolved with importlib. Kernels are generated from the task's inference notebook by
`papermill --prepare-only` (parameters baked in) and never edited by hand; `kernel-metadata.json` always says
`enable_internet: false`. Outputs default to kernels/<slug>/ (kernels) and kernels/datasets/<slug>/ (datasets), both
git-ignored. RUN is a run directory or a run name under outputs/. The Kaggle user comes from --user, else
$KAGGLE_USERNAME, else a placeholder (`lib.kaggle.meta.USER_PLACEHOLDER`; rebuild with
--user before pushing). Nothing here talks to Kaggle: pushing is the kaggle CLI's job (kernels/README.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from lib.tasks import DEFAULT_TASK, get_task
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


# ---------------------------------------------------------------- the task's kernel
@dataclass(frozen=True)
class KernelSpec:
    """A task's Kaggle kernel, from its spec's `extra["kernel"]` (every key but `half` and `wheels` required)."""

    task: str
    notebook: Path                  # the inference notebook (notebooks/<task>/<notebook>)
    code_slug: str                  # code dataset slug
    weights_prefix: str             # weights dataset slug = <weights_prefix>-<run name>
    wheels_slug: str                # wheels dataset slug
    collect_weights: str            # "module:function": run_dir -> (manifest, {bundle file name: source path})
    wheels: Tuple[str, ...] = KAGGLE_MISSING  # requirements the Kaggle image lacks
    half: Tuple[str, ...] = ()      # bundle file-name prefixes whose checkpoints --half stores as float16

    def collector(self) -> Callable[[PathLike], Tuple[Dict[str, Any], Dict[str, Path]]]:
        """The `collect_weights` function the spec names, imported by name."""
        module, sep, name = self.collect_weights.partition(":")
        if not sep or not module or not name:
            raise ValueError(f"task {self.task}: extra['kernel']['collect_weights'] must be 'module:function', got "
                             f"{self.collect_weights!r}")
        fn = getattr(importlib.import_module(module), name, None)
        if not callable(fn):
            raise ValueError(f"task {self.task}: {self.collect_weights!r} is not a function")
        return fn


_KERNEL_KEYS = {"notebook", "code_slug", "weights_prefix", "wheels_slug", "collect_weights"}


def kernel_spec(task: Optional[str] = None) -> KernelSpec:
    """The kernel of `task` (default ich); ValueError when the task declares none or declares it incompletely."""
    spec = get_task(task)
    decl = spec.extra.get("kernel")
    if not isinstance(decl, dict):
        raise ValueError(f"task {spec.name!r} declares no Kaggle kernel (its spec has no extra['kernel'])")
    missing, unknown = _KERNEL_KEYS - set(decl), set(decl) - _KERNEL_KEYS - {"wheels", "half"}
    if missing or unknown:
        raise ValueError(f"task {spec.name}: extra['kernel'] lacks {sorted(missing)} / has unknown keys "
                         f"{sorted(unknown)}; expected {sorted(_KERNEL_KEYS)} (+ wheels, half)")
    return KernelSpec(task=spec.name, notebook=spec.notebooks_dir / decl["notebook"], code_slug=decl["code_slug"],
                      weights_prefix=decl["weights_prefix"], wheels_slug=decl["wheels_slug"],
                      collect_weights=decl["collect_weights"], wheels=tuple(decl.get("wheels", KAGGLE_MISSING)),
                      half=tuple(decl.get("half", ())))


def run_task(run_dir: PathLike, task: Optional[str] = None) -> str:
    """The task of a run: its manifest.json's `task` (runs without one are ich runs); `task`, when given, must agree."""
    path = Path(run_dir) / "manifest.json"
    recorded = json.loads(path.read_text()).get("task") if path.is_file() else None
    if task and recorded and task != recorded:
        raise ValueError(f"--task {task!r} but {path} records task {recorded!r}")
    name = task or recorded or DEFAULT_TASK
    get_task(name)  # unknown -> KeyError listing the tasks
    return name


# ---------------------------------------------------------------- names and sizes
def weights_slug(run_name: str, prefix: str = "rsna-ich-weights") -> str:
    return slugify(f"{prefix}-{run_name}")[:50].strip("-")


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
                 license_name: str = LICENSE, task: Optional[str] = None) -> Path:
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
    name = get_task(task).name
    manifest = {"kind": "code", "task": name, "git_commit": git_commit(), "python": sys.version.split()[0]}
    desc = (f"The `lib` package of the RSNA pipelines ({name} kernel) at commit {manifest['git_commit']} "
            "(generated by lib.kaggle).")
    return _finish_dataset(folder, slug, user, license_name, desc, manifest)


def package_weights(run: PathLike, out: Optional[PathLike] = None, slug: Optional[str] = None,
                    user: Optional[str] = None, license_name: str = LICENSE, half: bool = False,
                    task: Optional[str] = None) -> Path:
    """Copy a run's inference models (the task's `collect_weights`; ICH: `lib.kaggle.bundle.collect_weights`, fold
    CNN best.pth, sequence heads, blend) into a dataset folder with a manifest (architecture, preprocessing, params,
    folds, OOF metrics, git commit). The task comes from the run's manifest.json (`task` must agree).

    Files are flattened to one level (`cnn_fold0.pth`, ...) so the dataset needs no --dir-mode. `half`: store the
    checkpoints the task's kernel names (ICH: the CNNs) as float16 (half the size; loaded back as float32).
    """
    from lib.kaggle import bundle

    run_dir = resolve_run(run)
    ks = kernel_spec(run_task(run_dir, task))
    slug = slug or weights_slug(run_dir.name, ks.weights_prefix)
    manifest, files = ks.collector()(run_dir)
    folder = _fresh_dir(Path(out) if out else KERNELS / "datasets" / slug)
    for name, src in files.items():
        is_ckpt = name.endswith((".pth", ".pt"))
        bundle.copy_checkpoint(src, folder / name, half=half and is_ckpt and name.startswith(ks.half or ("cnn_",)))
    manifest.update(kind="weights", half=bool(half))
    desc = (f"Inference weights of run {manifest.get('run')!r} (git {manifest.get('git_commit')}); OOF metrics: "
            f"{ {k: v for k, v in manifest.get('metrics', {}).items() if k.endswith(('_logloss', '_auc'))} }")
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
                 private: bool = True, code_slug: Optional[str] = None, weights: Optional[str] = None,
                 wheels_slug: Optional[str] = None, wheels: Sequence[str] = (), out: Optional[PathLike] = None,
                 extra: Optional[Dict[str, Any]] = None, notebook: Optional[PathLike] = None,
                 task: Optional[str] = None) -> Path:
    """kernels/<slug>/: `<slug>.ipynb` (the task's inference notebook through papermill prepare-only) +
    kernel-metadata.json. The task comes from the run's manifest.json (`task` must agree; ich without one).

    `weights` defaults to the weights slug of `run` (whose weights must then be complete: the task's
    `collect_weights` runs); `code_slug` / `wheels_slug` / `notebook` default to the task's kernel spec; `wheels`
    overrides the wheels dataset's requirements.txt; an empty `wheels_slug` attaches no wheels dataset. `extra`
    bakes further notebook parameters (bs, num_workers, ...).
    """
    import papermill as pm

    from lib.run.runner import notebook_parameters

    if len(slugify(slug)) < 5 or slugify(slug) != slug:
        raise ValueError(f"kernel slug must be lower-case letters, digits and '-', >= 5 characters; got {slug!r}")
    run_dir = resolve_run(run)
    ks = kernel_spec(run_task(run_dir, task))
    code_slug = ks.code_slug if code_slug is None else code_slug
    wheels_slug = ks.wheels_slug if wheels_slug is None else wheels_slug
    notebook = Path(notebook) if notebook else ks.notebook
    if not weights:
        ks.collector()(run_dir)  # a kernel for a run that could not be packaged would fail on Kaggle
        weights = weights_slug(run_dir.name, ks.weights_prefix)
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
    meta = kernel_metadata(slug, code_file, [r for r in refs if r], get_task(ks.task).competition, title=title,
                           user=user, gpu=gpu, private=private)
    atomic_write_text(folder / "kernel-metadata.json", json.dumps(meta, indent=2))
    for w in validate_kernel_folder(folder):
        print(f"warning: {w}", file=sys.stderr)
    return folder


# ---------------------------------------------------------------- CLI
def _common(p: argparse.ArgumentParser, slug: Optional[str]) -> None:
    p.add_argument("--out", type=Path, default=None, help="output folder (default kernels/datasets/<slug>)")
    p.add_argument("--slug", default=None, help=f"dataset slug (default {slug})")
    p.add_argument("--user", default=None, help="Kaggle user (default $KAGGLE_USERNAME or a placeholder)")
    p.add_argument("--license", default=LICENSE, help=f"Kaggle license name (default {LICENSE!r})")
    p.add_argument("--task", default=None, help="task whose kernel this is for (default: the run's, else ich)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lib.kaggle", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    _common(sub.add_parser("package-code", help="the lib package as a dataset"), "the task's code slug")
    p = sub.add_parser("package-weights", help="a run's inference weights + manifest as a dataset")
    p.add_argument("run", help="run directory or run name under outputs/")
    p.add_argument("--half", action="store_true", help="store the task's large checkpoints as float16")
    _common(p, "<the task's weights prefix>-<run>")
    p = sub.add_parser("package-wheels", help="offline wheels for what the Kaggle image lacks")
    _common(p, "the task's wheels slug")
    p.add_argument("--packages", nargs="+", default=None, help="requirements to fetch (default: the task's list)")
    p.add_argument("--python", default=KAGGLE_PYTHON, help="Kaggle's Python version (X.Y)")
    p.add_argument("--platform", nargs="+", default=list(KAGGLE_PLATFORMS), dest="platforms", help="wheel tags")
    p.add_argument("--find-links", type=Path, default=None, help="local wheel folder instead of PyPI")
    p.add_argument("--deps", action="store_true", help="also fetch the packages' dependencies")
    p.add_argument("--dry-run", action="store_true", help="print the pip command only")
    p = sub.add_parser("build-kernel", help="generate kernels/<slug>/ from the task's inference notebook")
    p.add_argument("--run", required=True, help="run directory or run name under outputs/")
    p.add_argument("--slug", required=True, help="kernel slug")
    p.add_argument("--task", default=None, help="the run's task (default: its manifest.json, else ich)")
    p.add_argument("--title", default=None, help="kernel title (default: from the slug)")
    p.add_argument("--user", default=None, help="Kaggle user (default $KAGGLE_USERNAME or a placeholder)")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=True, help="enable a GPU")
    p.add_argument("--private", action=argparse.BooleanOptionalAction, default=True, help="private kernel")
    p.add_argument("--code-slug", default=None, help="default: the task's code slug")
    p.add_argument("--weights-slug", default=None, help="default <the task's weights prefix>-<run>")
    p.add_argument("--wheels-slug", default=None, help="default: the task's wheels slug; '' attaches none")
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
            _report(package_code(args.out, args.slug or kernel_spec(args.task).code_slug, args.user, args.license,
                                 task=args.task))
        elif args.cmd == "package-weights":
            _report(package_weights(args.run, args.out, args.slug, args.user, args.license, args.half, task=args.task))
        elif args.cmd == "package-wheels":
            ks = kernel_spec(args.task)
            folder = package_wheels(args.out, args.slug or ks.wheels_slug, args.packages or list(ks.wheels),
                                    args.python, args.platforms, args.find_links, args.deps, args.user, args.license,
                                    args.dry_run)
            if not args.dry_run:
                _report(folder)
        elif args.cmd == "build-kernel":
            _report(build_kernel(args.run, args.slug, args.title, args.user, args.gpu, args.private,
                                 code_slug=args.code_slug, weights=args.weights_slug, wheels_slug=args.wheels_slug,
                                 wheels=args.wheels, out=args.out, extra=_extra(args.param), task=args.task))
        else:
            for folder in args.folders:
                kind = "kernel" if (folder / "kernel-metadata.json").exists() else "dataset"
                warns = (validate_kernel_folder if kind == "kernel" else validate_dataset_folder)(folder)
                print(f"{folder}: {kind} metadata ok" + "".join(f"\n  warning: {w}" for w in warns))
    except (FileNotFoundError, FileExistsError, KeyError, ValueError, RuntimeError) as exc:  # + metadata / bundle
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

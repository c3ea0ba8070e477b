"""Kaggle metadata files: kernel-metadata.json and dataset-metadata.json, written and checked the way the kaggle
CLI reads them (`kaggle kernels push`, `kaggle datasets create`), plus this repo's offline rules.

The Kaggle user comes from --user, else $KAGGLE_USERNAME, else `USER_PLACEHOLDER` (replace it, or regenerate with
--user, before pushing). Nothing here talks to Kaggle.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from lib.paths import PathLike

USER_PLACEHOLDER = "your-kaggle-username"
LICENSE = "other"  # Kaggle license name; CC0-1.0, CC-BY-4.0, Apache 2.0, MIT, ... (--license)


class KaggleMetadataError(ValueError):
    """A kernel-metadata.json / dataset-metadata.json the kaggle CLI would reject (or that is not offline)."""


# ---------------------------------------------------------------- names
def kaggle_user(user: Optional[str] = None) -> str:
    """--user, else $KAGGLE_USERNAME, else USER_PLACEHOLDER."""
    return user or os.environ.get("KAGGLE_USERNAME") or USER_PLACEHOLDER


def slugify(text: str) -> str:
    """Kaggle-style slug: lower case, runs of other characters -> '-' ('RSNA ICH demo' -> 'rsna-ich-demo')."""
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")


def title_of(slug: str, limit: int = 50) -> str:
    """A title that slugifies back to `slug` ('rsna-ich-code' -> 'Rsna Ich Code'), at most `limit` characters."""
    return " ".join(w.capitalize() for w in slug.split("-"))[:limit].strip()


# ---------------------------------------------------------------- metadata
def dataset_metadata(slug: str, title: Optional[str] = None, user: Optional[str] = None, license_name: str = LICENSE,
                     description: str = "") -> Dict[str, Any]:
    """dataset-metadata.json content (the fields `kaggle datasets create` reads)."""
    return {"title": title or title_of(slug), "id": f"{kaggle_user(user)}/{slug}", "licenses": [{"name": license_name}],
            "description": description, "keywords": []}


def kernel_metadata(slug: str, code_file: str, datasets: Sequence[str], competition: str, title: Optional[str] = None,
                    user: Optional[str] = None, gpu: bool = True, private: bool = True) -> Dict[str, Any]:
    """kernel-metadata.json content for a kernel of `competition` (its Kaggle slug, from the task spec);
    `datasets` are slugs of the same user; internet is always off."""
    owner = kaggle_user(user)
    return {"id": f"{owner}/{slug}", "title": title or title_of(slug), "code_file": code_file,
            "language": "python", "kernel_type": "notebook", "is_private": bool(private), "enable_gpu": bool(gpu),
            "enable_tpu": False, "enable_internet": False, "keywords": [],
            "dataset_sources": [d if "/" in d else f"{owner}/{d}" for d in datasets],
            "competition_sources": [competition], "kernel_sources": [], "model_sources": []}


def _read_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise KaggleMetadataError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise KaggleMetadataError(f"{path} is not valid JSON: {exc}") from exc


def _owner_slug(ref: Any, what: str, path: Path) -> List[str]:
    parts = str(ref).split("/") if isinstance(ref, str) else []
    if len(parts) != 2 or not all(parts):
        raise KaggleMetadataError(f"{path}: {what} must be '<user>/<slug>', got {ref!r}")
    return parts


def validate_kernel_folder(folder: PathLike) -> List[str]:
    """Check kernel-metadata.json as `kaggle kernels push` reads it, plus this repo's offline rules.

    Errors raise KaggleMetadataError; returns warnings (title not resolving to the slug, placeholder user).
    """
    folder = Path(folder)
    path = folder / "kernel-metadata.json"
    meta, warn = _read_json(path), []
    owner, slug = _owner_slug(meta.get("id"), "id", path)
    if len(slug) < 5:
        raise KaggleMetadataError(f"{path}: kernel slug {slug!r} must have at least 5 characters")
    title = meta.get("title") or ""
    if len(title) < 5:
        raise KaggleMetadataError(f"{path}: title {title!r} must have at least 5 characters")
    if slugify(title) != slug.lower():
        warn.append(f"title {title!r} does not resolve to the slug {slug!r} (kaggle warns about this)")
    code = folder / str(meta.get("code_file") or "")
    if not meta.get("code_file") or not code.is_file():
        raise KaggleMetadataError(f"{path}: code_file {meta.get('code_file')!r} is not a file in {folder}")
    for key, want in (("language", "python"), ("kernel_type", "notebook")):
        if meta.get(key) != want:
            raise KaggleMetadataError(f"{path}: {key} must be {want!r}, got {meta.get(key)!r}")
    for key in ("is_private", "enable_gpu", "enable_tpu", "enable_internet"):
        if key in meta and not isinstance(meta[key], bool):
            raise KaggleMetadataError(f"{path}: {key} must be a JSON boolean, got {meta[key]!r}")
    if meta.get("enable_internet") is not False:
        raise KaggleMetadataError(f"{path}: enable_internet must be set explicitly to false (kaggle defaults to on)")
    if not meta.get("competition_sources"):
        raise KaggleMetadataError(f"{path}: competition_sources must name the competition the kernel submits to")
    for ref in meta.get("dataset_sources") or []:
        _owner_slug(ref, "every dataset_sources entry", path)
    json.loads(code.read_text())  # a notebook kaggle can parse
    if owner == USER_PLACEHOLDER:
        warn.append(f"id uses the placeholder user {USER_PLACEHOLDER!r}: rebuild with --user before pushing")
    return warn


def validate_dataset_folder(folder: PathLike) -> List[str]:
    """Check dataset-metadata.json as `kaggle datasets create` reads it; returns warnings, raises on errors."""
    path = Path(folder) / "dataset-metadata.json"
    meta, warn = _read_json(path), []
    owner, slug = _owner_slug(meta.get("id"), "id", path)
    title = meta.get("title") or ""
    if slug == "INSERT_SLUG_HERE" or title == "INSERT_TITLE_HERE":
        raise KaggleMetadataError(f"{path}: still has the `kaggle datasets init` defaults")
    for what, value in (("slug", slug), ("title", title)):
        if not 6 <= len(value) <= 50:
            raise KaggleMetadataError(f"{path}: dataset {what} {value!r} must have 6 to 50 characters")
    lic = meta.get("licenses")
    if not isinstance(lic, list) or len(lic) != 1 or not isinstance(lic[0], dict) or not lic[0].get("name"):
        raise KaggleMetadataError(f"{path}: licenses must be exactly one {{'name': ...}}, got {lic!r}")
    sub = meta.get("subtitle")
    if sub and not 20 <= len(sub) <= 80:
        raise KaggleMetadataError(f"{path}: subtitle must have 20 to 80 characters, got {len(sub)}")
    if owner == USER_PLACEHOLDER:
        warn.append(f"id uses the placeholder user {USER_PLACEHOLDER!r}: repackage with --user before pushing")
    return warn

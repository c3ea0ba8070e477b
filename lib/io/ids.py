"""IDs read from headers and CSVs are checked once, here, before anything uses them as a name.

Two rules: every ID must be *safe* (`SAFE_ID`: letters, digits, `.`, `_`, `-`, no `..`, at most 128 characters,
so no path separator, NUL, leading `/` or `.`), and where the task declares a pattern (its spec's `id_pattern`,
e.g. ICH `ID_[0-9a-fA-F]+`) the ID must match it whole. `child_path` is the second line of defence: a path built
from an ID must stay inside its folder.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, List, Optional, Tuple, Union

#: What any ID may look like, whatever the task (DICOM UIDs, RSNA `ID_<hex>`, BraTS `00012`, hashes).
SAFE_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_SAFE = re.compile(SAFE_ID)


class BadIdError(ValueError):
    """An ID (from a header or a CSV) that cannot be used, or a path built from an ID leaving its folder."""


def id_problem(value: object, pattern: Optional[str] = None, what: str = "ID") -> Optional[str]:
    """Why `value` is not a usable ID (None when it is): not a string, unsafe, or not matching `pattern`."""
    if not isinstance(value, str):
        return f"{what} {value!r} is not a string"
    if not _SAFE.fullmatch(value) or ".." in value:
        return (f"{what} {value!r} is not a safe ID (letters, digits, '.', '_', '-'; no path separator, '..', "
                "NUL or leading '/' or '.'; at most 128 characters)")
    if pattern is not None and not re.fullmatch(pattern, value):
        return f"{what} {value!r} does not match the task's ID pattern {pattern!r}"
    return None


def check_ids(values: Iterable[object], pattern: Optional[str] = None, what: str = "ID",
              source: str = "input") -> None:
    """Raise BadIdError naming `source`, the count and the first bad values when any ID fails `id_problem`."""
    bad: List[Tuple[object, str]] = []
    n = 0
    for v in values:
        reason = id_problem(v, pattern, what)
        if reason is not None:
            n += 1
            if len(bad) < 3:
                bad.append((v, reason))
    if n:
        raise BadIdError(f"{source}: {n} invalid {what}s, e.g. " + "; ".join(r for _, r in bad))


def child_path(folder: Union[str, os.PathLike], name: str, suffix: str = "") -> Path:
    """`folder/<name><suffix>`, refused (BadIdError) unless it is a plain file name that resolves inside `folder`."""
    folder = Path(folder)
    leaf = f"{name}{suffix}"
    target = folder / leaf
    inside = os.path.realpath(target).startswith(os.path.join(os.path.realpath(folder), ""))
    if not leaf or leaf in (".", "..") or "/" in leaf or "\\" in leaf or "\x00" in leaf or not inside:
        raise BadIdError(f"{leaf!r} would be written outside {folder} (an ID must be a plain file name)")
    return target

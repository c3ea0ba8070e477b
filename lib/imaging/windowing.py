"""HU -> uint8 images: the named window table, window policies, the head crop and the on-disk image cache.

Units: every function takes Hounsfield units (float32, (H, W)) and returns [0, 1] float32 or uint8, as its
docstring says. Windows are `Window(center=..., width=...)`, never bare tuples (fastai stores (width, level), the
2nd-place code (center, width)). Pipeline per image (`render`): head box on a 4x smaller brain-window image ->
crop the HU -> centred square pad with air -> resize the HU to `img_size` -> window at the small size (cheap).

Cache (`build_cache`): `<cache_root>/<cache_key>/` holds meta.json (policy, windows, img_size, crop, fmt,
version), one `<image_id>.png` (or `.npy`) per image, uint8 (S, S, 3) read back RGB by `load_cached`,
sources.parquet (image_id, path, size, mtime_ns: the DICOM each image was rendered from, so a changed file is
rendered again) and bad.csv (image_id, path, reason) when some files could not be read.
"""
from __future__ import annotations

import ctypes
import io
import json
import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple, Union

import cv2
import numpy as np
import pandas as pd
from lib.progress import progress_bar

from lib.io.dicom import HU_MIN, DicomError, read_hu
from lib.io.ids import BadIdError, child_path
from lib.paths import atomic_write, atomic_write_text
from lib.registry import Registry

PathLike = Union[str, Path]
CACHE_VERSION = 1
FORMATS = ("png", "npy")
# zlib level 1 with no PNG row filter: on CT slices both smaller (~53 KB at 256 px) and faster to encode and decode
# than level 1 with adaptive filters (~56 KB) or OpenCV's default RLE strategy (~61 KB)
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]


@dataclass(frozen=True, kw_only=True)
class Window:
    """A display window in HU: `lo = center - width/2` maps to 0, `hi = center + width/2` to 1."""

    center: float
    width: float

    def __post_init__(self) -> None:
        if not self.width > 0:
            raise ValueError(f"window width must be > 0 HU, got {self.width!r}")

    @property
    def lo(self) -> float:
        return self.center - self.width / 2

    @property
    def hi(self) -> float:
        return self.center + self.width / 2


WINDOWS: Dict[str, Window] = {
    "brain": Window(center=40, width=80),
    "subdural": Window(center=80, width=200),
    "soft_tissue": Window(center=40, width=380),  # NoBrainer/Appian call this channel "bone"
    "bone": Window(center=600, width=2800),  # SeuTao, 5th place
    "stroke": Window(center=32, width=8),  # fastai dicom_windows.stroke
}


def apply_window(hu: np.ndarray, window: Window) -> np.ndarray:
    """HU (any shape) -> float32 in [0, 1]: linear from `window.lo` (0) to `window.hi` (1), clipped outside."""
    out = (np.asarray(hu, np.float32) - np.float32(window.lo)) * np.float32(1.0 / window.width)
    return np.clip(out, 0.0, 1.0, out=out)


def window_uint8(hu: np.ndarray, window: Window) -> np.ndarray:
    """HU (any shape) -> uint8 in [0, 255]: `round_half_up(255 * apply_window(hu))` (40 HU in 40/80 -> 128)."""
    out = (np.asarray(hu, np.float32) - np.float32(window.lo)) * np.float32(255.0 / window.width) + np.float32(0.5)
    return np.clip(out, 0.0, 255.5, out=out).astype(np.uint8)


def hist_scaled_uint8(hu: np.ndarray, n_bins: int = 100) -> np.ndarray:
    """HU -> uint8 by the image's own frequency histogram (fastai `freqhist_bins` + `hist_scaled`).

    Break points are the sorted values at fractions 0.001, (i + 0.5)/n_bins, 0.999; HU is mapped piecewise
    linearly onto [0, 1] through them (an equalisation: each bin gets about the same share of grey levels).
    """
    flat = np.asarray(hu, np.float32).ravel()
    frac = np.concatenate([[0.001], (np.arange(n_bins) + 0.5) / n_bins, [0.999]])
    idx = np.minimum((frac * flat.size).astype(np.int64), flat.size - 1)
    brks = np.unique(np.partition(flat, np.unique(idx))[idx])
    ys = np.linspace(0.0, 255.0, len(brks)) if len(brks) > 1 else np.zeros(1)
    return (np.interp(flat, brks, ys) + 0.5).astype(np.uint8).reshape(np.shape(hu))


@dataclass(frozen=True)
class WindowPolicy:
    """HU (H, W) float32 -> uint8 (H, W, 3) RGB, one channel per entry of `channels`.

    A channel is a name in WINDOWS, or "hist" (per-image histogram scaling, see `hist_scaled_uint8`).
    """

    name: str
    channels: Tuple[str, str, str]

    def __post_init__(self) -> None:
        bad = [c for c in self.channels if c != "hist" and c not in WINDOWS]
        if len(self.channels) != 3 or bad:
            raise ValueError(f"policy {self.name!r}: need 3 channels from {sorted(WINDOWS)} or 'hist', "
                             f"got {self.channels!r}")

    def __call__(self, hu: np.ndarray) -> np.ndarray:
        out = np.empty(np.shape(hu) + (3,), np.uint8)
        done: Dict[str, np.ndarray] = {}
        for i, ch in enumerate(self.channels):
            if ch not in done:
                done[ch] = hist_scaled_uint8(hu) if ch == "hist" else window_uint8(hu, WINDOWS[ch])
            out[..., i] = done[ch]
        return out

    def describe(self) -> List[dict]:
        """JSON-able channel list for meta.json: window centre/width in HU, or the hist rule."""
        return [{"channel": c, **(asdict(WINDOWS[c]) if c in WINDOWS else {"rule": "fastai hist_scaled"})}
                for c in self.channels]


POLICIES: Registry = Registry("window policy")
POLICIES.add("brain_subdural_soft", WindowPolicy("brain_subdural_soft", ("brain", "subdural", "soft_tissue")))
# fastai `to_3chan(brain, subdural, bins)`: the third channel is the slice's own histogram equalisation
POLICIES.add("bsb", WindowPolicy("bsb", ("brain", "subdural", "hist")))
POLICIES.add("bone", WindowPolicy("bone", ("brain", "subdural", "bone")))
# single window, 3 identical channels: for adjacent-slice input the dataset stacks (s-1, s, s+1) itself
POLICIES.add("brain", WindowPolicy("brain", ("brain", "brain", "brain")))


def create_policy(name: str) -> WindowPolicy:
    """The registered policy `name`; unknown names raise KeyError listing the valid ones."""
    return POLICIES.get(name)


class Box(NamedTuple):
    """Pixel box, half-open: rows top:bottom, columns left:right."""

    top: int
    bottom: int
    left: int
    right: int


def _disc(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def head_box(hu: np.ndarray, mask_size: int = 128, sigma: float = 2.0, thresh: float = 0.2, erode: int = 3,
             merge: int = 4, min_frac: float = 0.01) -> Optional[Box]:
    """Bounding box of the head in HU image (H, W), or None for a near-empty slice.

    fastai `mask_from_blur` idea, at low resolution (~0.3 ms instead of ~3 ms at 512 px): shrink so the long
    side is ~`mask_size` px (INTER_AREA), brain window 40/80 -> [0, 1], Gaussian blur (`sigma` low-res px),
    threshold `thresh`. Erode by a disc of radius `erode` low-res px: that deletes thin objects (the table /
    head-rest arc). Pieces closer than 2 * `merge` px count as one object (skull-base slices split into face,
    skull and spine); keep the largest such object and grow its box back by `erode`. None when it covers less
    than `min_frac` of the image (slices above or below the head).
    """
    h, w = hu.shape
    f = max(1, round(max(h, w) / mask_size))
    small = cv2.resize(hu, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_AREA) if f > 1 else hu
    mask = (cv2.GaussianBlur(apply_window(small, WINDOWS["brain"]), (0, 0), sigma) > thresh).astype(np.uint8)
    if erode > 0:
        mask = cv2.erode(mask, _disc(erode))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(cv2.dilate(mask, _disc(merge)) if merge else mask)
    if n <= 1:
        return None
    head = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8) & mask
    if cv2.countNonZero(head) < max(1, min_frac * small.size):
        return None
    x, y, bw, bh = cv2.boundingRect(head)
    sy, sx = h / small.shape[0], w / small.shape[1]
    return Box(max(0, int((y - erode) * sy)), min(h, int(np.ceil((y + bh + erode) * sy))),
               max(0, int((x - erode) * sx)), min(w, int(np.ceil((x + bw + erode) * sx))))


def square_crop(hu: np.ndarray, box: Optional[Box] = None, fill: float = HU_MIN) -> np.ndarray:
    """HU (H, W) -> float32 HU (L, L), L = the box's long side: the box centred, padded with `fill` (air).

    `box=None` means the whole image (non-square images are padded, never stretched).
    """
    box = box or Box(0, hu.shape[0], 0, hu.shape[1])
    crop = np.ascontiguousarray(hu[box.top:box.bottom, box.left:box.right], dtype=np.float32)
    h, w = crop.shape
    if h == w:
        return crop
    dh, dw = max(0, w - h), max(0, h - w)
    return cv2.copyMakeBorder(crop, dh // 2, dh - dh // 2, dw // 2, dw - dw // 2, cv2.BORDER_CONSTANT, value=fill)


def render(hu: np.ndarray, policy: Union[str, WindowPolicy] = "brain_subdural_soft", img_size: int = 256,
           crop: bool = True) -> np.ndarray:
    """HU (H, W) -> uint8 (img_size, img_size, 3) RGB in the policy's channel order.

    crop=True: head box (`head_box`), or the whole image when the slice is near-empty (no head found).
    Either way the region is padded to a centred square with air and the HU is resized (INTER_AREA when
    shrinking, INTER_LINEAR when enlarging) before windowing, so windowing runs at the small size.
    """
    policy = create_policy(policy) if isinstance(policy, str) else policy
    sq = square_crop(hu, head_box(hu) if crop else None)
    if sq.shape[0] != img_size:
        interp = cv2.INTER_AREA if sq.shape[0] > img_size else cv2.INTER_LINEAR
        sq = cv2.resize(sq, (img_size, img_size), interpolation=interp)
    return policy(sq)


# ---------------------------------------------------------------- cache
@dataclass(frozen=True)
class CacheResult:
    """Where the cache is and what this build did: images written, skipped (already there) and bad."""

    dir: Path
    written: int
    skipped: int
    bad: int


def cache_key(policy: str = "brain_subdural_soft", img_size: int = 256, crop: bool = True, fmt: str = "png") -> str:
    """Folder name naming the preprocessing, e.g. 'brain_subdural_soft-s256-crop-png'."""
    create_policy(policy)
    if fmt not in FORMATS:
        raise ValueError(f"cache format {fmt!r} is not one of {FORMATS}")
    return f"{policy}-s{int(img_size)}-{'crop' if crop else 'full'}-{fmt}"


def cache_meta(policy: str, img_size: int, crop: bool, fmt: str) -> dict:
    """The meta.json content of a cache folder."""
    return {"key": cache_key(policy, img_size, crop, fmt), "policy": policy,
            "windows": create_policy(policy).describe(), "img_size": int(img_size), "crop": bool(crop), "fmt": fmt,
            "channel_order": "RGB", "version": CACHE_VERSION}


def _encode(img: np.ndarray, fmt: str) -> bytes:
    """uint8 (S, S, 3) RGB -> file bytes (PNG stores BGR, so channels are swapped on the way in and out)."""
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, img, allow_pickle=False)
        return buf.getvalue()
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), PNG_PARAMS)
    if not ok:
        raise RuntimeError(f"cv2.imencode failed for an image of shape {img.shape}")
    return buf.tobytes()


def _write_atomic(path: Path, data: bytes) -> None:
    """lib.paths.atomic_write for one cache image, without its mkstemp + reopen (this runs once per image)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _build_one(task: Tuple[str, str, str, str, int, bool, str]) -> Tuple[str, str, str]:
    """Worker: one DICOM -> one cache file. Returns (image_id, path, '') or (image_id, path, reason) if bad."""
    image_id, path, out_dir, policy, img_size, crop, fmt = task
    try:
        target = child_path(out_dir, image_id, f".{fmt}")
        hu = read_hu(path)
    except (DicomError, FileNotFoundError, BadIdError) as exc:
        return image_id, path, f"{type(exc).__name__}: {exc}"
    try:
        img = render(hu, policy, img_size, crop)
    except Exception as exc:  # a bug or an unforeseen image: stop the build, but say which file
        raise RuntimeError(f"{image_id} ({path}): rendering failed for HU image {hu.shape}: {exc!r}") from exc
    _write_atomic(target, _encode(img, fmt))
    return image_id, path, ""


def keep_freed_memory() -> None:
    """Tell glibc malloc to keep freed large blocks (up to 256 MB) instead of returning them to the OS.

    Each 512 px slice makes a few MB of temporaries (file bytes, HU floats); with glibc's default trimming they
    are unmapped after every image and page-faulted back in for the next, which costs ~1.3 ms per image, more
    than the decode. Process-wide and harmless (a little more resident memory); a no-op where libc is not glibc.
    """
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process, libc's among them
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: blocks < 32 MB come from the heap, not fresh mmaps
        libc.mallopt(-1, 256 * 2**20)  # M_TRIM_THRESHOLD: keep up to 256 MB of free heap top
    except (OSError, AttributeError):
        pass


@contextmanager
def cv2_single_thread() -> Iterator[None]:
    """cv2 on one thread (its pool's worker threads stopped) inside the block, the previous setting after it.

    Around a fork: a child that inherits cv2's pool state hangs for ever in its first cv2 call (cache workers here,
    DataLoader workers in lib.data.datasets.ImageLoader). Around a benchmark: every pipeline measured on one core."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the parent, which ends the pool
    cv2.setNumThreads(1)  # processes are the parallelism; cv2's own threads would oversubscribe the cores
    keep_freed_memory()


def _make_pool(workers: int) -> Pool:
    """Worker processes. Linux: fork (starts in ms, nothing re-imported), with cv2's thread pool shut down around
    the fork: a child that inherits cv2 worker-thread state hangs for ever in its first cv2 call. Elsewhere:
    spawn (workers re-import `__main__`, so it must be a real file or a `-m` module)."""
    if sys.platform.startswith("linux"):
        with cv2_single_thread():
            return get_context("fork").Pool(workers, initializer=_worker_init)
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file and not os.path.exists(main_file):
        raise RuntimeError(f"worker processes re-import __main__, but {main_file!r} is not a file (a script piped "
                           "on stdin?): run it as a file or with -m, or pass workers=1")
    return get_context("spawn").Pool(workers, initializer=_worker_init)


def _n_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _as_pairs(items: Union[pd.DataFrame, Iterable[Tuple[str, PathLike]]]) -> List[Tuple[str, str]]:
    """(image_id, path) str pairs, exact repeats dropped; one id with two different paths is an error."""
    if isinstance(items, pd.DataFrame):
        missing = {"image_id", "path"} - set(items.columns)
        if missing:
            raise KeyError(f"items DataFrame lacks columns {sorted(missing)}; has {list(items.columns)}")
        items = zip(items["image_id"].astype(str), items["path"].astype(str))
    pairs = list(dict.fromkeys((str(i), str(p)) for i, p in items))
    ids = pd.Series([i for i, _ in pairs])
    if ids.duplicated().any():
        raise ValueError(f"image ids with more than one path: {sorted(set(ids[ids.duplicated()]))[:5]}")
    return pairs


def _prepare_dir(out: Path, meta: dict) -> None:
    """Create the cache folder, check meta.json of an existing one, delete temp files left by a killed build."""
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old != meta:
            raise ValueError(f"{out}: meta.json {old} does not match this build {meta}; delete the folder to rebuild")
    else:
        atomic_write_text(meta_path, json.dumps(meta, indent=1))
    for tmp in out.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


_SOURCE_COLUMNS = ["image_id", "path", "size", "mtime_ns"]


def _identity(path: str) -> Tuple[int, int]:
    try:
        st = os.stat(path)
        return int(st.st_size), int(st.st_mtime_ns)
    except OSError:
        return -1, -1


def _read_sources(out: Path) -> Dict[str, Tuple[str, int, int]]:
    """image_id -> (path, size, mtime_ns) of the DICOM its cached image was rendered from ({} if none recorded)."""
    path = out / "sources.parquet"
    if not path.exists():
        return {}
    df = pd.read_parquet(path)
    return {str(i): (str(p), int(n), int(m)) for i, p, n, m in df[_SOURCE_COLUMNS].itertuples(index=False)}


def _write_sources(out: Path, sources: Dict[str, Tuple[str, int, int]]) -> None:
    df = pd.DataFrame([(i, *v) for i, v in sorted(sources.items())], columns=_SOURCE_COLUMNS)
    atomic_write(out / "sources.parquet", lambda p: df.astype({"size": "int64", "mtime_ns": "int64"})
                 .to_parquet(p, index=False))


def _update_bad_csv(out: Path, tried: Iterable[str], bad: List[Tuple[str, str, str]]) -> None:
    """bad.csv (image_id, path, reason): rows of images retried this run are replaced by this run's outcome."""
    path = out / "bad.csv"
    old = pd.read_csv(path, dtype=str) if path.exists() else pd.DataFrame(columns=["image_id", "path", "reason"])
    old = old[~old["image_id"].isin(set(tried))]
    new = pd.concat([old, pd.DataFrame(bad, columns=["image_id", "path", "reason"])], ignore_index=True)
    if len(new) or path.exists():
        atomic_write_text(path, new.sort_values("image_id").to_csv(index=False))


def build_cache(items: Union[pd.DataFrame, Iterable[Tuple[str, PathLike]]], cache_root: PathLike,
                policy: str = "brain_subdural_soft", img_size: int = 256, crop: bool = True, fmt: str = "png",
                workers: Optional[int] = None, progress: bool = True) -> CacheResult:
    """Render every (image_id, DICOM path) to `cache_root/<cache_key>/<image_id>.<fmt>` (uint8 RGB, `render`).

    Resumable: an image is skipped when its file exists and was rendered from the same DICOM (path, size, mtime:
    sources.parquet); a changed or replaced file is rendered again. Each file is written to a temp name then renamed, so a
    killed build leaves no half file (its temp files are deleted on the next run; so run one build per folder
    at a time). A folder whose meta.json differs from these parameters is refused. Unreadable files
    (DicomError, missing) go to `bad.csv` with the reason and never stop the build. `workers` processes
    (None = all cores; 1 = in this process, which then keeps freed memory, see `keep_freed_memory`); with
    `progress` a tqdm bar and a one-line summary (written / skipped / bad) are shown.
    """
    pairs = _as_pairs(items)
    out = Path(cache_root) / cache_key(policy, img_size, crop, fmt)
    _prepare_dir(out, cache_meta(policy, img_size, crop, fmt))
    done = {e.name for e in os.scandir(out)}
    sources = _read_sources(out)
    ident = {i: (p, *_identity(p)) for i, p in pairs}
    todo = [(i, p, str(out), policy, int(img_size), bool(crop), fmt) for i, p in pairs
            if f"{i}.{fmt}" not in done or sources.get(i) != ident[i]]
    workers = max(1, min(workers or _n_cpus(), len(todo) or 1))
    tried: List[str] = []
    bad: List[Tuple[str, str, str]] = []
    bar = progress_bar(total=len(todo), desc=f"cache {out.name}", disable=not progress, unit="img")
    if workers == 1:
        keep_freed_memory()
        results = map(_build_one, todo)
        pool = None
    else:
        pool = _make_pool(workers)
        results = pool.imap_unordered(_build_one, todo, chunksize=max(1, min(64, len(todo) // (workers * 32))))
    try:
        for image_id, path, reason in results:
            tried.append(image_id)
            if reason:
                bad.append((image_id, path, reason))
                sources.pop(image_id, None)
            else:
                sources[image_id] = ident[image_id]
            bar.update()
        if pool is not None:
            pool.close()
            pool.join()
    finally:  # also on Ctrl-C / errors: finished files stay, bad files seen so far are recorded
        bar.close()
        if pool is not None:
            pool.terminate()
        _update_bad_csv(out, tried, bad)
        if tried:
            _write_sources(out, sources)
    res = CacheResult(out, len(todo) - len(bad), len(pairs) - len(todo), len(bad))
    if progress:
        print(f"cache {out}: written {res.written}, skipped {res.skipped}, bad {res.bad}")
    return res


def load_cached(cache_dir: PathLike, image_id: str) -> np.ndarray:
    """uint8 (S, S, 3) RGB, channels in the policy's order, of `image_id` from a cache folder."""
    png, npy = child_path(cache_dir, str(image_id), ".png"), child_path(cache_dir, str(image_id), ".npy")
    if png.exists():
        img = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
        if img is None or img.ndim != 3:
            raise ValueError(f"{png}: not a 3-channel PNG written by build_cache")
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if npy.exists():
        return np.load(npy)
    raise FileNotFoundError(f"image {image_id!r} is not in cache {cache_dir} (no {png.name} or {npy.name})")

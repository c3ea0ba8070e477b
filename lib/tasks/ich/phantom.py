"""Synthetic RSNA-ICH data set: head-CT DICOM series with the 5 haemorrhage subtypes, in the exact Kaggle layout.

`python -m lib.phantom --out DIR [--studies N] [--seed S] [--size 512] [--test-frac F] [--slices MIN MAX]`
writes DIR/stage_2_train/ID_*.dcm, DIR/stage_2_test/ID_*.dcm, DIR/stage_2_train.csv (with 4 duplicated images'
rows), DIR/stage_2_sample_submission.csv, and the held-back truth in DIR/_truth/ (stage_2_test_truth.csv,
slices.csv: one row per image with true order / quirks / contrast fractions, bleeds.csv: one row per bleed and
slice with a probe pixel, phantom.json: parameters and counts). Same arguments -> same bytes.

Anatomy and bleeds are drawn by `lib.tasks.ich.phantom_anatomy`, DICOM bytes come from `lib.tasks.ich.phantom_dicom`; this module plans
the studies (patients, split, the header quirks of the RSNA files, bleed placement) and writes the files.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import pandas as pd
from lib.progress import progress_bar

from lib.tasks.ich.labels import SUBTYPES
from lib.tasks.ich.phantom_anatomy import BLEED_KINDS, Bleed, Head, Pose, Renderer
from lib.tasks.ich.phantom_dicom import (ENCODINGS, StudyPlan, dicom_bytes,  # noqa: F401 (ENCODINGS re-exported)
                                         encode_hu)

PathLike = Union[str, Path]
VERSION = "phantom-1"

#: Other per-series quirks: (share, minimum count).
QUIRKS = {"explicit_vr": (0.25, 1), "tilt": (0.30, 1), "multi_window": (0.25, 1), "odd_size": (0.05, 1),
          "dup_position": (0.05, 1), "gap": (0.05, 1)}
ODD_SIZES = ((464, 464), (768, 768), (638, 490))  # (rows, cols) at --size 512, scaled with the size
N_DUPLICATED_ROWS = 4  # images whose 6 CSV rows appear twice (as in stage_2_train.csv)
#: Bleed kinds: share of bleeding patients having it, and (u_lo, u_hi, min slices, max slices).
P_BLEEDER = 0.55  # share of patients with a haemorrhage (their follow-up studies keep most of it)
KIND_P = {"epidural": 0.13, "intraparenchymal": 0.45, "intraventricular": 0.35, "subarachnoid": 0.45,
          "subdural": 0.5}
KIND_RANGE = {"epidural": (0.3, 0.88, 3, 6), "intraparenchymal": (0.32, 0.82, 3, 8),
              "intraventricular": (0.44, 0.62, 3, 6), "subarachnoid": (0.45, 0.9, 3, 7),
              "subdural": (0.32, 0.92, 5, 12)}
SAH_BASAL_RANGE = (0.2, 0.42, 3, 5)
MIN_BLEED_MM2 = 3.0  # a planned bleed counts (label 1) on a slice where its area is at least this


# ----------------------------------------------------------------------------------------------------- planning
def _hex_ids(rng: np.random.Generator, n: int, digits: int, used: set) -> List[str]:
    """n new unique `ID_<digits hex>` strings (unique across everything in `used`)."""
    out: List[str] = []
    while len(out) < n:
        s = "ID_" + "".join("0123456789abcdef"[d] for d in rng.integers(0, 16, digits))
        if s not in used:
            used.add(s)
            out.append(s)
    return out


def _quota(rng: np.random.Generator, n: int, share: float, minimum: int) -> np.ndarray:
    """Bool (n,) with exactly max(minimum, round(share * n)) (at most n) randomly placed True values."""
    k = min(n, max(minimum, int(round(share * n))))
    out = np.zeros(n, bool)
    out[rng.permutation(n)[:k]] = True
    return out


def _assign_encodings(rng: np.random.Generator, n: int) -> List[str]:
    """ENCODINGS names for n series by largest remainder of the shares (at least one bug12 series)."""
    names, shares = list(ENCODINGS), np.array(list(ENCODINGS.values()))
    counts = np.floor(shares * n).astype(int)
    for i in np.argsort(-(shares * n - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    if counts[0] == 0 and n:
        counts[0], counts[int(np.argmax(counts))] = 1, counts[int(np.argmax(counts))] - 1
    return list(rng.permutation(np.repeat(names, counts)))


def _floats(obj: object) -> object:
    """numpy scalars -> Python floats (recursively in tuples): numpy-2 float64 scalars would upcast float32 images."""
    return tuple(_floats(v) for v in obj) if isinstance(obj, tuple) else float(obj)


def sample_head(rng: np.random.Generator) -> Head:
    """A random patient's anatomy (mm, HU)."""
    A = rng.uniform(68, 77)
    grey = rng.uniform(35, 40)
    blobs = tuple((rng.uniform(0.14, 0.34), rng.choice([0.0, np.pi]) + rng.uniform(-1.0, 1.0), rng.uniform(2, 4),
                   rng.uniform(65, 95)) for _ in range(rng.integers(0, 4)))
    return _head(A=A, B=A * rng.uniform(1.18, 1.28), H=rng.uniform(122, 138), scalp=rng.uniform(4, 6.5),
                bone=rng.uniform(5, 8), harm=tuple((k, rng.uniform(-a, a), rng.uniform(0, 2 * np.pi))
                                                   for k, a in ((1, 0.02), (2, 0.03), (3, 0.025), (4, 0.012))),
                grey=grey, white=grey - rng.uniform(7, 10), csf=rng.uniform(3, 9), scalp_hu=rng.uniform(35, 55),
                bone_hu=rng.uniform(1300, 1800), diploe=rng.uniform(300, 800), vent_scale=rng.uniform(0.7, 1.6),
                sulc_eps=rng.uniform(0.03, 0.09), sulc_depth=rng.uniform(7, 13),
                pineal_hu=rng.uniform(150, 400) if rng.random() < 0.5 else 0.0,
                choroid_hu=rng.uniform(100, 250) if rng.random() < 0.35 else 0.0,
                falx_hu=rng.uniform(150, 300) if rng.random() < 0.15 else rng.uniform(45, 60),
                sss_hu=rng.uniform(50, 62), blobs=blobs)


def _head(**kw: object) -> Head:
    return Head(**{k: _floats(v) for k, v in kw.items()})


def _pose(rows: int, cols: int, **kw: object) -> Pose:
    return Pose(rows=int(rows), cols=int(cols), **{k: _floats(v) for k, v in kw.items()})


def sample_pose(rng: np.random.Generator, head: Head, rows: int, cols: int) -> Pose:
    """Head placement for one study: FOV 225-256 mm at the nominal matrix, rotation, head-rest, noise."""
    ps = rng.uniform(0.45, 0.5) * 512 / cols  # the field of view (225-256 mm) does not depend on the matrix
    fov_y = rows * ps
    cy = max(0.45 * fov_y + rng.uniform(-5, 5), head.B + 6)
    return _pose(rows=rows, cols=cols, ps=ps, cx=cols * ps / 2 + rng.uniform(-8, 8), cy=cy,
                rot=math.radians(rng.uniform(-10, 10)), table_gap=rng.uniform(5, 14), table_r=rng.uniform(120, 160),
                table_th=rng.uniform(2.5, 4), table_hu=rng.uniform(120, 300), noise_sd=rng.uniform(4, 7))


def sample_bleed_geometry(rng: np.random.Generator, kind: str) -> Dict[str, object]:
    """Patient-level geometry of one bleed kind (re-used by the patient's follow-up studies)."""
    side = rng.choice([0.0, np.pi])
    if kind == "epidural":
        return dict(uc=rng.uniform(0.4, 0.8), hu=rng.uniform(65, 85),
                    p=(side + rng.uniform(-0.7, 0.7), rng.uniform(0.3, 0.5), rng.uniform(10, 22)))
    if kind == "subdural":
        return dict(uc=rng.uniform(0.45, 0.8), hu=rng.uniform(55, 80),
                    p=(side + rng.uniform(-0.8, 0.8), rng.uniform(0.7, 1.3), rng.uniform(5, 14)))
    if kind == "subarachnoid":
        basal = rng.random() < 0.4
        return dict(uc=rng.uniform(0.24, 0.38) if basal else rng.uniform(0.5, 0.85), hu=rng.uniform(60, 80),
                    p=(float(basal), rng.uniform(-np.pi, np.pi), rng.uniform(0.5, 1.0)))
    if kind == "intraparenchymal":
        if rng.random() < 0.5:
            xn, yn = rng.choice([-0.3, 0.3]), rng.uniform(-0.15, 0.1)
        else:
            r, a = rng.uniform(0.3, 0.6), rng.uniform(-np.pi, np.pi)
            xn, yn = r * math.cos(a), r * math.sin(a)
        return dict(uc=rng.uniform(0.38, 0.75), hu=rng.uniform(55, 80),
                    p=(xn, yn, rng.uniform(8, 22), rng.uniform(3, 7), rng.uniform(14, 20)))
    if kind == "intraventricular":
        return dict(uc=rng.uniform(0.48, 0.58), hu=rng.uniform(55, 75),
                    p=(rng.uniform(-0.05, 0.25), float(rng.choice([0, 0, -1, 1]))))
    raise ValueError(f"unknown bleed kind {kind!r}; expected one of {BLEED_KINDS}")


def plan_bleed(rng: np.random.Generator, kind: str, geo: Dict[str, object], u: np.ndarray) -> Optional[Bleed]:
    """Place a bleed over 3-12 consecutive slice positions around geo['uc'] (u = relative height per position)."""
    lo, hi, nmin, nmax = SAH_BASAL_RANGE if kind == "subarachnoid" and geo["p"][0] else KIND_RANGE[kind]
    idx = np.flatnonzero((u >= lo) & (u <= hi))
    if len(idx) < nmin:  # thick slices: the nmin positions nearest the centre, if not far outside the range
        idx = np.sort(np.argsort(np.abs(u - geo["uc"]), kind="stable")[:nmin])
        if len(idx) < nmin or u[idx[0]] < lo - 0.12 or u[idx[-1]] > hi + 0.12:
            return None
    nb = int(min(rng.integers(nmin, nmax + 1), len(idx)))
    centre = int(idx[np.argmin(np.abs(u[idx] - geo["uc"]))])
    i0 = int(np.clip(centre - nb // 2, idx[0], idx[-1] - nb + 1))
    p = tuple(float(v) for v in geo["p"])
    if kind in ("epidural", "subdural", "intraparenchymal"):  # follow-up studies: the same bleed, resized
        p = p[:2] + (p[2] * rng.uniform(0.75, 1.15),) + p[3:]  # thickness / radius
    return Bleed(kind=kind, i0=i0, i1=i0 + nb - 1, hu=float(geo["hu"]), p=p)


def _positions(rng: np.random.Generator, head: Head, n: int, gap: bool) -> np.ndarray:
    """n slice heights (mm above the skull base, ascending) ending at / just above the vertex; 5 mm apart, or
    wider when 5 mm would not cover the head; with `gap` one interior slice is missing (2x spacing there)."""
    sp = 5.0 if (n - 1) * 5.0 >= 0.85 * head.H else round(head.H * rng.uniform(0.9, 1.05) / (n - 1), 2)
    z = head.H * rng.uniform(0.975, 1.03) - sp * np.arange(n + int(gap))[::-1]
    if gap:
        z = np.delete(z, rng.integers(3, len(z) - 3))
    return z


def _split_patients(rng: np.random.Generator, sizes: List[int], test_frac: float) -> List[str]:
    """Patient-level split: 'test' for patients totalling about test_frac of the studies, else 'train'."""
    target = int(round(test_frac * sum(sizes)))
    if test_frac > 0 and sum(sizes) > 1:
        target = max(target, 1)
    split, n_test = ["train"] * len(sizes), 0
    for p in rng.permutation(len(sizes)):
        if n_test + sizes[p] <= target and split.count("train") > 1:
            split[p], n_test = "test", n_test + sizes[p]
    return split


def plan_dataset(seed: int, studies: int, size: int, test_frac: float, slices: Tuple[int, int]) -> List[StudyPlan]:
    """All studies' plans (deterministic for the arguments)."""
    rng = np.random.default_rng(seed)
    sizes: List[int] = []
    while sum(sizes) < studies:
        sizes.append(int(rng.choice([1, 2, 3], p=[0.7, 0.2, 0.1])))
    sizes[-1] -= sum(sizes) - studies
    psplit = _split_patients(rng, sizes, test_frac)
    used: set = set()
    seeds = np.random.SeedSequence(seed).spawn(studies)
    encs = _assign_encodings(rng, studies)
    q = {name: _quota(rng, studies, share, m) for name, (share, m) in QUIRKS.items()}
    plans: List[StudyPlan] = []
    for p, (n_st, split) in enumerate(zip(sizes, psplit)):
        head, pid = sample_head(rng), _hex_ids(rng, 1, 8, used)[0]
        kinds = [k for k in BLEED_KINDS if rng.random() < KIND_P[k]]
        if not kinds:
            kinds = [str(rng.choice(BLEED_KINDS, p=np.array(list(KIND_P.values())) / sum(KIND_P.values())))]
        kinds = kinds if rng.random() < P_BLEEDER else []
        geo = {k: sample_bleed_geometry(rng, k) for k in kinds}
        for _ in range(n_st):
            plans.append(_plan_study(rng, len(plans), split, pid, head, geo, encs, q, size, slices, used, seeds))
    _ensure_every_kind_in_train(rng, plans)
    train = [pl for pl in plans if pl.split == "train"]
    if train:
        victim = train[int(rng.integers(len(train)))]
        victim.corrupt = int(rng.integers(len(victim.z)))
    return plans


def _plan_study(rng: np.random.Generator, i: int, split: str, pid: str, head: Head, geo: Dict, encs: List[str],
                q: Dict[str, np.ndarray], size: int, slices: Tuple[int, int], used: set,
                seeds: Sequence[np.random.SeedSequence]) -> StudyPlan:
    rows = cols = size
    if q["odd_size"][i]:
        r, c = ODD_SIZES[int(rng.integers(len(ODD_SIZES)))]
        rows, cols = max(8, round(r * size / 512)), max(8, round(c * size / 512))
    n = int(rng.integers(slices[0], slices[1] + 1))
    z = _positions(rng, head, n, bool(q["gap"][i]))
    dup = int(rng.integers(len(z) // 4, max(len(z) // 4 + 1, 3 * len(z) // 4))) if q["dup_position"][i] else -1
    pose = sample_pose(rng, head, rows, cols)
    study_uid, series_uid = _hex_ids(rng, 2, 10, used)
    z_table = rng.uniform(-200, 150)
    plan = StudyPlan(index=i, split=split, patient_id=pid, study_uid=study_uid, series_uid=series_uid,
                     image_ids=_hex_ids(rng, len(z) + (dup >= 0), 9, used), z=z,
                     dist=np.round(z - z[0] + z_table, 3), head=head, pose=pose, enc=encs[i], seed=seeds[i],
                     explicit=bool(q["explicit_vr"][i]), tilt=float(rng.uniform(10, 25)) if q["tilt"][i] else 0.0,
                     multi_window=bool(q["multi_window"][i]),
                     window=(int(rng.choice([30, 35, 40, 40, 50])), int(rng.choice([80, 80, 100, 120, 150]))),
                     origin=(round(-cols * pose.ps / 2 + rng.uniform(-5, 5), 3),
                             round(-rows * pose.ps / 2 + rng.uniform(-30, 10), 3), 0.0), dup=dup,
                     gap=bool(q["gap"][i]), fov_pad=encs[i] == "s16" and bool(rng.random() < 0.5))
    for kind, g in geo.items():
        if rng.random() < 0.85 or len(geo) == 1:
            bl = plan_bleed(rng, kind, g, z / head.H)
            if bl is not None:
                plan.bleeds.append(bl)
    return plan


def _ensure_every_kind_in_train(rng: np.random.Generator, plans: List[StudyPlan]) -> None:
    """Add a bleed of each kind missing from the train studies to some train study that can hold it."""
    train = [p for p in plans if p.split == "train"]
    for kind in BLEED_KINDS:
        if any(b.kind == kind for p in train for b in p.bleeds):
            continue
        for j in rng.permutation(len(train)):
            pl = train[int(j)]
            bl = plan_bleed(rng, kind, sample_bleed_geometry(rng, kind), pl.z / pl.head.H)
            if bl is not None:
                pl.bleeds.append(bl)
                break


# ---------------------------------------------------------------------------------------------------- rendering
def _profile(bl: Bleed, i: int) -> float:
    """Bleed size factor on slice position i: 1 in the middle of its range, about 0.6 at the ends."""
    t = (i - bl.i0 + 0.5) / (bl.i1 - bl.i0 + 1)
    return 0.55 + 0.45 * math.sin(math.pi * t)


def _fractions(masks: Dict[Tuple[int, int], object], rng: np.random.Generator) -> Dict[Tuple[int, int], float]:
    """Contrast fraction per (bleed, position): 1 on core slices, 0.15-0.35 on the first and last present slice."""
    out: Dict[Tuple[int, int], float] = {}
    for b in sorted({b for b, _ in masks}):
        pos = sorted(i for bb, i in masks if bb == b)
        for i in pos:
            out[(b, i)] = 1.0
        ends = [pos[0], pos[-1]] if len(pos) >= 3 else [pos[int(rng.integers(2))]] if len(pos) == 2 else []
        for i in ends:
            out[(b, i)] = float(rng.uniform(0.15, 0.35))
    return out


def _probe(mask: np.ndarray) -> Tuple[int, int, float]:
    """A pixel deep inside a soft mask (row, col) and its inscribed radius in pixels."""
    binary = (mask >= 0.5).astype(np.uint8)
    if not binary.any():
        r, c = np.unravel_index(int(np.argmax(mask)), mask.shape)
        return int(r), int(c), 0.0
    dt = cv2.distanceTransform(np.pad(binary, 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dt)), dt.shape)
    return int(r), int(c), float(dt[r, c])


def _fov_outside(pose: Pose) -> np.ndarray:
    """Bool (rows, cols): pixels outside the reconstruction circle."""
    yy, xx = np.mgrid[0:pose.rows, 0:pose.cols]
    rad = min(pose.rows, pose.cols) / 2
    return (yy + 0.5 - pose.rows / 2) ** 2 + (xx + 0.5 - pose.cols / 2) ** 2 > rad ** 2


def render_study(plan: StudyPlan, out_dir: Path) -> Tuple[List[Dict[str, object]], List[Dict[str, object]]]:
    """Render and write one study's DICOM files; returns (one record per image, one row per bleed and slice)."""
    rng = np.random.default_rng(plan.seed)
    r = Renderer(plan.head, plan.pose, (float(plan.z.min()), float(plan.z.max())), rng)
    ps2 = plan.pose.ps ** 2
    bases, fines, masks = [], {}, {}
    for i, z in enumerate(plan.z):
        hu, ctx = r.render(float(z))
        for b, bl in enumerate(plan.bleeds):
            m = r.bleed(bl, ctx, _profile(bl, i)) if bl.i0 <= i <= bl.i1 else None
            if m is not None:
                out = r.to_output(m[0])
                if out.sum() * ps2 >= MIN_BLEED_MM2:
                    masks[(b, i)], fines[i] = (m, out), ctx["fine"]
        bases.append(hu)
    fracs = _fractions(masks, rng)
    outside = _fov_outside(plan.pose) if plan.fov_pad else None
    positions = list(range(len(plan.z))) + ([plan.dup] if plan.dup >= 0 else [])
    folder = out_dir / f"stage_2_{plan.split}"
    records, bleed_rows = [None] * len(positions), []
    for j in rng.permutation(len(positions)):
        i, image_id = positions[j], plan.image_ids[j]
        hu = bases[i].copy()
        labels, fr = dict.fromkeys(SUBTYPES, 0), dict.fromkeys(BLEED_KINDS, 0.0)
        for b, bl in enumerate(plan.bleeds):
            if (b, i) in masks:
                (core, rim), out = masks[(b, i)]
                r.composite(hu, core, rim, fracs[(b, i)], bl, fines[i])
                labels[bl.kind] = labels["any"] = 1
                fr[bl.kind] = max(fr[bl.kind], fracs[(b, i)])
                pr, pc, prad = _probe(out)
                bleed_rows.append(dict(image_id=image_id, series_uid=plan.series_uid, bleed=b, subtype=bl.kind,
                                       frac=round(fracs[(b, i)], 4), area_mm2=round(float(out.sum()) * ps2, 2),
                                       probe_row=pr, probe_col=pc, probe_radius_px=round(prad, 2)))
        img = r.finish(hu, rng)
        if outside is not None:
            img[outside] = -3024.0
        raw, hdr = encode_hu(img, plan.enc)
        data = dicom_bytes(plan, image_id, float(plan.dist[i]), raw, hdr, str(10 ** 13 + plan.index * 1000 + j))
        if j == plan.corrupt:
            data = data[: len(data) - raw.nbytes]  # truncated right after the PixelData header, like ID_6431af929
        (folder / f"{image_id}.dcm").write_bytes(data)
        records[j] = dict(image_id=image_id, split=plan.split, patient_id=plan.patient_id,
                          study_uid=plan.study_uid, series_uid=plan.series_uid, pos_idx=i, n_pos=len(plan.z),
                          z_head_mm=round(float(plan.z[i]), 3), u=round(float(plan.z[i] / plan.head.H), 4),
                          dist_mm=float(plan.dist[i]), encoding=plan.enc, explicit_vr=plan.explicit,
                          tilt_deg=round(plan.tilt, 3), rows=plan.pose.rows, cols=plan.pose.cols,
                          dup_copy=j >= len(plan.z), corrupt=j == plan.corrupt, **labels,
                          **{f"frac_{k}": round(v, 4) for k, v in fr.items()})
    return records, bleed_rows


def _render_job(args: Tuple[StudyPlan, str]) -> Tuple[int, List[Dict], List[Dict]]:
    cv2.setNumThreads(1)
    recs, rows = render_study(args[0], Path(args[1]))
    return args[0].index, recs, rows


# ------------------------------------------------------------------------------------------------------ outputs
_MARKER = "PHANTOM"
_OURS = ("stage_2_train", "stage_2_test", "stage_2_train.csv", "stage_2_sample_submission.csv", "_truth")


def _prepare_out(out: Path) -> None:
    """Create `out`; clear a previous phantom there; refuse to touch competition data we did not write."""
    present = [n for n in _OURS if (out / n).exists()]
    if present and not (out / "_truth" / _MARKER).is_file():
        raise FileExistsError(f"{out} already holds {present} not written by lib.phantom; choose an empty folder")
    for n in present:
        shutil.rmtree(out / n) if (out / n).is_dir() else (out / n).unlink()
    for split in ("train", "test"):
        (out / f"stage_2_{split}").mkdir(parents=True)
    (out / "_truth").mkdir()
    (out / "_truth" / _MARKER).write_text(f"written by lib.phantom ({VERSION}); the folder may be overwritten\n")


def _long_lines(ids: Sequence[str], labels: Optional[pd.DataFrame]) -> str:
    """Kaggle long format `ID,Label` text: 6 rows per image in SUBTYPES order (labels None -> 0.5)."""
    lines = ["ID,Label"]
    for iid in ids:
        vals = ["0.5"] * len(SUBTYPES) if labels is None else [str(int(v)) for v in labels.loc[iid, list(SUBTYPES)]]
        lines += [f"{iid}_{s},{v}" for s, v in zip(SUBTYPES, vals)]
    return "\n".join(lines) + "\n"


def _write_tables(out: Path, seed: int, slices_df: pd.DataFrame, bleeds_df: pd.DataFrame) -> List[str]:
    """The CSVs: train labels (with duplicated images), sample submission, test truth, slices / bleeds truth."""
    rng = np.random.default_rng([seed, 7919])
    lab = slices_df.set_index("image_id")
    train = slices_df.loc[slices_df["split"] == "train", "image_id"].to_numpy()
    test = slices_df.loc[slices_df["split"] == "test", "image_id"].to_numpy()
    order = list(rng.permutation(train))
    ok = slices_df.loc[(slices_df["split"] == "train") & ~slices_df["corrupt"], "image_id"].to_numpy()
    dups = sorted(rng.choice(ok, size=min(N_DUPLICATED_ROWS, len(ok)), replace=False).tolist())
    for iid in dups:
        order.insert(int(rng.integers(len(order) + 1)), iid)
    (out / "stage_2_train.csv").write_text(_long_lines(order, lab))
    test_order = list(rng.permutation(test))
    (out / "stage_2_sample_submission.csv").write_text(_long_lines(test_order, None))
    (out / "_truth" / "stage_2_test_truth.csv").write_text(_long_lines(test_order, lab))
    slices_df.to_csv(out / "_truth" / "slices.csv", index=False)
    bleeds_df.to_csv(out / "_truth" / "bleeds.csv", index=False)
    return dups


def _counts(df: pd.DataFrame) -> Dict[str, object]:
    """Images, studies, patients and positives per subtype of one split."""
    return dict(images=len(df), studies=int(df["series_uid"].nunique()), patients=int(df["patient_id"].nunique()),
                positives={s: int(df[s].sum()) for s in SUBTYPES},
                positive_rate={s: round(float(df[s].mean()), 4) if len(df) else 0.0 for s in SUBTYPES},
                studies_with_bleed=int(df.groupby("series_uid")["any"].max().sum()) if len(df) else 0)


def _manifest(plans: List[StudyPlan], params: Dict, slices_df: pd.DataFrame, dups: List[str]) -> Dict:
    """phantom.json: parameters, counts, which series carry which quirk, the planned bleeds."""
    has = {"tilt": lambda p: p.tilt > 0, "explicit_vr": lambda p: p.explicit, "multi_window": lambda p: p.multi_window,
           "odd_size": lambda p: (p.pose.rows, p.pose.cols) != (params["size"],) * 2,
           "dup_position": lambda p: p.dup >= 0, "gap": lambda p: p.gap, "fov_pad": lambda p: p.fov_pad}
    quirks = {name: [p.series_uid for p in plans if test(p)] for name, test in has.items()}
    return dict(version=VERSION, params=params, shares=dict(encodings=ENCODINGS, quirks=QUIRKS),
                counts={s: _counts(slices_df[slices_df["split"] == s]) for s in ("train", "test")},
                encodings={e: [p.series_uid for p in plans if p.enc == e] for e in ENCODINGS}, quirks=quirks,
                corrupt=slices_df.loc[slices_df["corrupt"], "image_id"].tolist(), duplicated_rows=dups,
                studies=[dict(series_uid=p.series_uid, study_uid=p.study_uid, patient_id=p.patient_id,
                              split=p.split, n_images=len(p.image_ids),
                              bleeds=[dict(kind=b.kind, i0=b.i0, i1=b.i1, hu=round(b.hu, 2)) for b in p.bleeds])
                         for p in plans])


def generate(out_dir: PathLike, studies: int = 40, seed: int = 0, size: int = 512, test_frac: float = 0.2,
             slices: Tuple[int, int] = (20, 32), workers: int = 0, progress: bool = True) -> Dict[str, object]:
    """Write a synthetic data set in the Kaggle layout under `out_dir`; returns a summary dict.

    workers: processes over studies (0 = min(cpu count, 4); 1 = in this process). Output bytes do not depend on it.
    """
    if studies < 1 or size < 16 or not 0 <= test_frac < 1 or not 8 <= slices[0] <= slices[1]:
        raise ValueError(f"need studies >= 1, size >= 16, 0 <= test_frac < 1 and 8 <= slices[0] <= slices[1]; "
                         f"got studies={studies}, size={size}, test_frac={test_frac}, slices={tuple(slices)}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    _prepare_out(out)
    params = dict(studies=studies, seed=seed, size=size, test_frac=test_frac, slices=list(slices))
    plans = plan_dataset(seed, studies, size, test_frac, (int(slices[0]), int(slices[1])))
    workers = min(os.cpu_count() or 1, 4, studies) if workers <= 0 else min(workers, studies)
    results: Dict[int, Tuple[List[Dict], List[Dict]]] = {}
    with progress_bar(total=sum(len(p.image_ids) for p in plans), desc="phantom", unit="img", disable=not progress) as bar:
        if workers == 1:
            for p in plans:
                results[p.index] = render_study(p, out)
                bar.update(len(p.image_ids))
        else:
            with mp.get_context("spawn").Pool(workers) as pool:
                for idx, recs, rows in pool.imap_unordered(_render_job, [(p, str(out)) for p in plans]):
                    results[idx] = (recs, rows)
                    bar.update(len(recs))
    slices_df = pd.DataFrame([r for i in sorted(results) for r in results[i][0]])
    slices_df = slices_df.sort_values(["split", "series_uid", "pos_idx", "image_id"], ignore_index=True)
    bleeds_df = pd.DataFrame([r for i in sorted(results) for r in results[i][1]],
                             columns=["image_id", "series_uid", "bleed", "subtype", "frac", "area_mm2", "probe_row",
                                      "probe_col", "probe_radius_px"])
    bleeds_df = bleeds_df.sort_values(["series_uid", "bleed", "image_id"], ignore_index=True)
    dups = _write_tables(out, seed, slices_df, bleeds_df)
    manifest = _manifest(plans, params, slices_df, dups)
    (out / "_truth" / "phantom.json").write_text(json.dumps(manifest, indent=1) + "\n")
    c = manifest["counts"]
    return dict(out_dir=str(out), images=len(slices_df), train_images=c["train"]["images"],
                test_images=c["test"]["images"], studies=studies, patients=int(slices_df["patient_id"].nunique()),
                train=c["train"], test=c["test"], corrupt=manifest["corrupt"], duplicated_rows=dups,
                seconds=round(time.perf_counter() - t0, 2))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """CLI: generate the data set and print a one-line summary."""
    ap = argparse.ArgumentParser(prog="python -m lib.phantom [ich]", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (Kaggle layout + _truth/)")
    ap.add_argument("--studies", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=512, help="nominal matrix (rows = cols)")
    ap.add_argument("--test-frac", type=float, default=0.2, help="share of studies (by patient) in stage_2_test")
    ap.add_argument("--slices", type=int, nargs=2, default=(20, 32), metavar=("MIN", "MAX"))
    ap.add_argument("--workers", type=int, default=0, help="processes (0 = auto); output does not depend on it")
    a = ap.parse_args(argv)
    s = generate(a.out, studies=a.studies, seed=a.seed, size=a.size, test_frac=a.test_frac,
                 slices=tuple(a.slices), workers=a.workers)
    pos = " ".join(f"{k}={v}" for k, v in s["train"]["positives"].items())
    print(f"phantom: {s['images']} images ({s['train_images']} train / {s['test_images']} test, {s['studies']} "
          f"studies, {s['patients']} patients) in {s['seconds']:.1f}s -> {s['out_dir']}; train positives: {pos}")
    return s


if __name__ == "__main__":
    main()

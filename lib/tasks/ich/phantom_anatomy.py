"""Synthetic head-CT anatomy for `lib.phantom`: one study's axial slices rendered in Hounsfield units.

Head frame (mm): x = patient right->left along image columns, y = anterior (-) -> posterior (+) along image rows,
z = height above the skull base (0) up to the skin vertex (`Head.H`). The head is three nested egg-shaped
ellipsoids (skin, outer table, inner table) plus brain, CSF, skull-base and face structures that change with
u = z / H. Images are float32 HU arrays (rows, cols); bleed masks are float32 in [0, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import cv2
import numpy as np

AIR = -1000.0
BLEED_KINDS = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
_ZC = 0.42  # relative height of the widest cross-section
NOISE_BLUR = 1.0  # px: CT noise is spatially correlated (lag-1 autocorrelation ~0.7-0.85 on RSNA slices)


@dataclass(frozen=True)
class Head:
    """Patient-level anatomy (mm, HU), shared by all studies of one patient."""

    A: float  # skin semi-axis left-right at the widest level
    B: float  # skin semi-axis anterior-posterior
    H: float  # skull base -> skin vertex
    scalp: float  # scalp thickness
    bone: float  # skull thickness at the vault (thicker towards the base)
    harm: Tuple[Tuple[int, float, float], ...]  # outline harmonics (k, relative amplitude, phase)
    grey: float
    white: float
    csf: float
    scalp_hu: float
    bone_hu: float  # cortical tables
    diploe: float  # HU drop in the diploe
    vent_scale: float  # ventricle size (atrophy > 1)
    sulc_eps: float  # sulcal width (0.03 young .. 0.09 atrophic)
    sulc_depth: float  # mm
    pineal_hu: float  # 0 = no pineal calcification
    choroid_hu: float  # 0 = no choroid plexus calcification
    falx_hu: float  # > 100 = calcified falx
    sss_hu: float  # dense superior sagittal sinus (a normal bleed mimic)
    blobs: Tuple[Tuple[float, float, float, float], ...]  # bone-adjacent hyperdensities (u, theta, radius, HU)


@dataclass(frozen=True)
class Pose:
    """Study-level placement of the head in the image (output matrix, mm)."""

    rows: int
    cols: int
    ps: float  # pixel spacing of the output matrix (mm)
    cx: float  # head centre, mm from the image's left edge
    cy: float  # head centre, mm from the image's top edge
    rot: float  # in-plane rotation (rad)
    table_gap: float  # air between the back of the head and the head-rest arc (mm)
    table_r: float
    table_th: float
    table_hu: float
    noise_sd: float  # HU


@dataclass(frozen=True)
class Bleed:
    """One haemorrhage planned over slice positions i0..i1 (inclusive). `p` is kind-specific geometry:

    epidural / subdural: (theta0, half_width_rad, thickness_mm); subarachnoid: (variant 0 convexity / 1 basal,
    theta0, half_width_rad); intraparenchymal: (xn, yn, radius_mm, oedema_mm, oedema_hu); intraventricular:
    (fluid level in normalised y, side -1 / 0 both / +1).
    """

    kind: str
    i0: int
    i1: int
    hu: float
    p: Tuple[float, ...]


def _ell(xn: np.ndarray, yn: np.ndarray, cx: float, cy: float, ax: float, ay: float, rot: float = 0.0) -> np.ndarray:
    """Bool mask of the ellipse centred (cx, cy) with semi-axes (ax, ay), rotated by `rot` rad."""
    dx, dy = xn - cx, yn - cy
    if rot:
        c, s = math.cos(rot), math.sin(rot)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    return (dx / max(ax, 1e-6)) ** 2 + (dy / max(ay, 1e-6)) ** 2 <= 1.0


def _bell(u: float, lo: float, hi: float) -> float:
    """0 outside [lo, hi], rising to 1 in the middle (sqrt-sine), for structures that appear over a z range."""
    if not lo < u < hi:
        return 0.0
    return math.sqrt(math.sin(math.pi * (u - lo) / (hi - lo)))


def _skin_scale(u: float) -> float:
    """Skin cross-section relative to the widest level."""
    if u >= _ZC:
        return math.sqrt(max(0.0, 1.0 - ((u - _ZC) / (1.0 - _ZC)) ** 2))
    if u >= 0:
        return 1.0 - 0.12 * ((_ZC - u) / _ZC) ** 2
    return 0.88 - 0.5 * min(-u, 0.3)


def _dome_scale(u: float, u_top: float) -> float:
    """Cross-section of a nested layer whose top is at relative height u_top."""
    if u >= _ZC:
        return math.sqrt(max(0.0, 1.0 - ((u - _ZC) / (u_top - _ZC)) ** 2))
    return _skin_scale(u)


def _face_scale(u: float) -> float:
    """Size of the face / orbit extension in front of the cranium (0 above the orbits)."""
    return float(np.clip((0.34 - u) / 0.1, 0, 1)) ** 0.5 * float(np.clip(1 + (u + 0.1) * 2.5, 0, 1))


def _unit_noise(rng: np.random.Generator, shape: Tuple[int, ...]) -> np.ndarray:
    """Smoothed Gaussian noise with unit std (float32), smoothed over the two leading axes."""
    f = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), 1.0)
    return f / f.std()


class Renderer:
    """Renders one study: `render(z)` -> (HU at render resolution, context); `finish` -> output HU.

    Small matrices are supersampled (render factor `f`) and area-averaged back, so thin structures get
    partial volume instead of aliasing.
    """

    def __init__(self, head: Head, pose: Pose, z_range: Tuple[float, float], rng: np.random.Generator):
        self.head, self.pose = head, pose
        self.f = f = max(1, math.ceil(256 / min(pose.rows, pose.cols)))
        self.ps = ps = pose.ps / f
        R, C = pose.rows * f, pose.cols * f
        ext = head.B * 1.2 + 6.0
        r0, r1 = [int(np.clip(v, 0, pose.rows)) * f for v in ((pose.cy - ext) / pose.ps, (pose.cy + ext) / pose.ps + 1)]
        c0, c1 = [int(np.clip(v, 0, pose.cols)) * f for v in ((pose.cx - ext) / pose.ps, (pose.cx + ext) / pose.ps + 1)]
        self.win = (slice(r0, r1), slice(c0, c1))
        Y, X = np.mgrid[r0:r1, c0:c1].astype(np.float32)
        X, Y = (X + 0.5) * ps - pose.cx, (Y + 0.5) * ps - pose.cy
        c, s = math.cos(pose.rot), math.sin(pose.rot)
        self.x, self.y = c * X + s * Y, -s * X + c * Y
        self.x2, self.y2 = self.x ** 2, self.y ** 2
        self.th = np.arctan2(self.y / head.B, self.x / head.A)
        P = np.ones_like(self.th)
        for k, amp, ph in head.harm:
            P += amp * np.cos(k * self.th + ph)
        self.P, self.invP = P, 1.0 / P
        self.c2, self.s2 = np.cos(self.th) ** 2, np.sin(self.th) ** 2
        self.canvas = self._table(R, C, rng)
        self.zs = np.arange(z_range[0] - 12.0, z_range[1] + 24.0, 12.0)
        self.coarse = np.stack([_unit_noise(rng, (16, 16, 3)) for _ in self.zs])
        self.fine = np.stack([_unit_noise(rng, (64, 64, 2)) for _ in self.zs])
        self.psf = 0.45 / ps  # partial-volume blur (px at render resolution)

    def _table(self, R: int, C: int, rng: np.random.Generator) -> np.ndarray:
        """Air canvas with the head-rest arc below the head (fixed in the image, separated by air)."""
        p, ps = self.pose, self.ps
        canvas = np.full((R, C), AIR, np.float32)
        Y, X = np.mgrid[0:R, 0:C].astype(np.float32)
        X, Y = (X + 0.5) * ps, (Y + 0.5) * ps
        yc = p.cy + self.head.B + p.table_gap - p.table_r
        xc = p.cx + float(rng.uniform(-6, 6))
        d = np.sqrt((X - xc) ** 2 + (Y - yc) ** 2) - p.table_r
        arc = (d >= 0) & (d <= p.table_th) & (Y - yc > p.table_r * math.cos(math.radians(68)))
        canvas[arc] = p.table_hu
        return canvas

    def _fields(self, z: float) -> Dict[str, np.ndarray]:
        """Smooth unit-std noise fields at height z on the head window: coarse n1, n2, n3 and fine tex, wig."""
        k = int(np.clip(np.searchsorted(self.zs, z) - 1, 0, len(self.zs) - 2))
        w = float(np.clip((z - self.zs[k]) / 12.0, 0, 1))
        norm = math.sqrt((1 - w) ** 2 + w ** 2)
        shape = (self.x.shape[1], self.x.shape[0])
        co, fi = [cv2.resize(((1 - w) * f[k] + w * f[k + 1]) / norm, shape, interpolation=cv2.INTER_LINEAR)
                  for f in (self.coarse, self.fine)]
        return dict(n1=co[..., 0], n2=co[..., 1], n3=co[..., 2], fine=fi[..., 0], wig=fi[..., 1])

    def _rho(self, a: float, b: float) -> np.ndarray:
        """Normalised radius of the egg-shaped outline with semi-axes (a, b): <= 1 inside."""
        return np.sqrt(self.x2 * (1.0 / (a * a)) + self.y2 * (1.0 / (b * b))) * self.invP

    def _box(self, cx: float, cy: float, r: float) -> Optional[Tuple[slice, slice]]:
        """Window sub-block (rows, cols) covering the disc of radius r mm around head point (cx, cy) mm."""
        p, c, s = self.pose, math.cos(self.pose.rot), math.sin(self.pose.rot)
        col = (c * cx - s * cy + p.cx) / self.ps - 0.5 - self.win[1].start
        row = (s * cx + c * cy + p.cy) / self.ps - 0.5 - self.win[0].start
        rp = r / self.ps + 2
        r0, r1 = max(0, int(row - rp)), min(self.x.shape[0], int(row + rp) + 2)
        c0, c1 = max(0, int(col - rp)), min(self.x.shape[1], int(col + rp) + 2)
        return (slice(r0, r1), slice(c0, c1)) if r1 > r0 and c1 > c0 else None

    def ell(self, cx: float, cy: float, ax: float, ay: float, rot: float = 0.0,
            scale: Tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
        """Bool window mask of an ellipse in head coordinates divided by `scale` (mm, or normalised by (a, b))."""
        sa, sb = scale
        out = np.zeros(self.x.shape, bool)
        box = self._box(cx * sa, cy * sb, max(ax, ay) * max(sa, sb))
        if box is not None:
            out[box] = _ell(self.x[box] / sa, self.y[box] / sb, cx, cy, ax, ay, rot)
        return out

    def _poly(self, pts: Sequence[Tuple[float, float]]) -> np.ndarray:
        """Bool window mask of a polygon given in head mm."""
        p, c, s = self.pose, math.cos(self.pose.rot), math.sin(self.pose.rot)
        r0, c0 = self.win[0].start, self.win[1].start
        xy = [((c * x - s * y + p.cx) / self.ps - 0.5 - c0, (s * x + c * y + p.cy) / self.ps - 0.5 - r0)
              for x, y in pts]
        mask = np.zeros(self.x.shape, np.uint8)
        cv2.fillPoly(mask, [np.round(np.array(xy) * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
        return mask.astype(bool)

    def render(self, z: float) -> Tuple[np.ndarray, Dict[str, object]]:
        """HU image (render resolution, float32) of the slice at height z (mm above the skull base) + context."""
        h = self.head
        u = z / h.H
        hu = self.canvas.copy()
        w = hu[self.win]
        f = self._fields(z)
        fine = f["fine"]
        ctx: Dict[str, object] = {"u": u, "n1": f["n1"], "wig": f["wig"], "fine": fine, "inner": None}
        s = _skin_scale(u)
        if s < 0.02:
            return hu, ctx
        face = _face_scale(u)
        skin = self._rho(h.A * s, h.B * s) <= 1
        if face > 0:
            skin |= self.ell(0, -0.55 * h.B, 0.7 * h.A * face, 0.62 * h.B * face)
        w[skin] = h.scalp_hu + 4 * fine[skin]
        if u < 0:
            self._neck(w, u, f)
            return hu, ctx
        sb = _dome_scale(u, 1 - h.scalp / h.H)
        if sb <= 0:
            return hu, ctx
        bone = self._rho((h.A - h.scalp) * sb, (h.B - h.scalp) * sb) <= 1
        if face > 0:
            bone |= self.ell(0, -0.55 * h.B, 0.7 * h.A * face - 4, 0.62 * h.B * face - 4)
        thick = h.bone * (1 + 0.9 * float(np.clip((_ZC - u) / _ZC, 0, 1)))
        si = _dome_scale(u, 1 - (h.scalp + h.bone) / h.H)
        a, b = (h.A - h.scalp - thick) * si, (h.B - h.scalp - thick) * si
        if si <= 0 or a < 3:
            w[bone] = h.bone_hu - 0.5 * h.diploe + 60 * fine[bone]
            return hu, ctx
        rho = self._rho(a, b)
        depth = (1 - rho) * self.P * np.sqrt(a * a * self.c2 + b * b * self.s2)  # mm inward from the inner table
        tt = np.clip(-depth / thick, 0, 1)
        w[bone] = (h.bone_hu - h.diploe * np.sin(np.pi * tt) ** 2 + 60 * fine)[bone]
        inner = rho <= 1
        xn, yn = self.x / a, self.y / b
        ctx.update(inner=inner, depth=depth, xn=xn, yn=yn, a=a, b=b)
        self._brain(w, ctx, f)
        self._midline(w, ctx)
        if u < 0.34:
            self._skull_base(w, ctx, f)
        self._mimics(w, ctx)
        return hu, ctx

    def _brain(self, w: np.ndarray, ctx: Dict, f: Dict[str, np.ndarray]) -> None:
        """Extra-axial CSF, cortex with wiggly sulci, white matter, deep grey nuclei and ventricles."""
        h, u, depth, xn, yn = self.head, ctx["u"], ctx["depth"], ctx["xn"], ctx["yn"]
        inner, a, b, n1 = ctx["inner"], ctx["a"], ctx["b"], f["n1"]
        k = max(10, int(round(2 * math.pi * math.sqrt((a * a + b * b) / 2) / 11.0)))
        cs = np.cos(k * self.th + 1.2 * f["n2"] + 2.4 * f["wig"])
        sd = h.sulc_depth * (0.75 + 0.3 * f["n3"] + 0.2 * f["wig"])
        grey = (depth < 2.8 + 0.8 * n1) | ((cs > 0.3) & (depth < sd + 2.5))
        val = np.where(grey, np.float32(h.grey), np.float32(h.white)) + 1.5 * f["fine"]
        val[(cs > 1 - h.sulc_eps) & (depth < sd)] = h.csf
        val[depth < 1.0] = h.csf
        nuclei = _bell(u, 0.33, 0.55)
        if nuclei > 0:
            for side in (-1, 1):
                deep = self.ell(side * 0.16, -0.2, 0.07 * nuclei, 0.1 * nuclei, scale=(a, b))
                deep |= self.ell(side * 0.3, -0.02, 0.08 * nuclei, 0.17 * nuclei, side * 0.3, scale=(a, b))
                deep |= self.ell(side * 0.1, 0.1, 0.08 * nuclei, 0.1 * nuclei, scale=(a, b))
                val[deep] = h.grey - 2
        vent = self._ventricles(a, b, u)
        val[vent] = h.csf
        w[inner] = val[inner]
        ctx.update(cs=cs, sd=sd, vent=vent & inner)

    def _ventricles(self, a: float, b: float, u: float) -> np.ndarray:
        """Lateral (frontal horns, bodies, occipital horns), third and fourth ventricles (bool)."""
        vs = self.head.vent_scale
        vent = np.zeros(self.x.shape, bool)
        for side in (-1, 1):
            fh, body, occ = _bell(u, 0.38, 0.62), _bell(u, 0.42, 0.7), _bell(u, 0.4, 0.56)
            if fh:
                vent |= self.ell(side * 0.1, -0.24, (0.05 * vs + 0.02) * fh, 0.17 * fh, side * 0.5, scale=(a, b))
            if body:
                vent |= self.ell(side * 0.1, 0.08, (0.04 * vs + 0.015) * body, 0.22 * body, -side * 0.08, scale=(a, b))
            if occ:
                vent |= self.ell(side * 0.19, 0.33, 0.045 * vs * occ, 0.12 * occ, -side * 0.6, scale=(a, b))
        third, fourth = _bell(u, 0.3, 0.44), _bell(u, 0.1, 0.27)
        if third:
            vent |= self.ell(0, 0.0, (0.012 * vs + 0.006) * third, 0.12 * third, scale=(a, b))
        if fourth:
            vent |= self.ell(0, 0.3, 0.07 * fourth, 0.05 * fourth, scale=(a, b))
        return vent

    def _midline(self, w: np.ndarray, ctx: Dict) -> None:
        """Interhemispheric fissure with the falx, Sylvian fissures, dense superior sagittal sinus."""
        h, u, depth, xn, yn, inner = self.head, ctx["u"], ctx["depth"], ctx["xn"], ctx["yn"], ctx["inner"]
        ax = np.abs(self.x)
        if u > 0.3:
            fiss = inner & (ax < 1.4) & ((np.abs(yn) > 0.4) | (u > 0.64)) & (depth > 0)
            w[fiss] = h.csf
            falx = fiss & (ax < 0.45)
            w[falx] = h.falx_hu if h.falx_hu < 100 else np.where(np.abs(yn[falx] + 0.5) < 0.1, h.falx_hu, 50.0)
        if 0.3 < u < 0.5:
            axn = np.abs(xn)
            syl = inner & (axn > 0.7) & (np.abs(yn + 0.12 - 0.3 * (1 - axn) + 0.05 * ctx["wig"]) < 0.018)
            w[syl] = h.csf
        if u > 0.45:
            sss = (depth > -0.2) & (depth < 5.0) & (ax < (5.0 - depth) * 0.8) & (self.y > 0)
            if u > 0.6:
                sss |= (depth > -0.2) & (depth < 4.0) & (ax < (4.0 - depth) * 0.7) & (self.y < 0)
            w[sss] = h.sss_hu

    def _skull_base(self, w: np.ndarray, ctx: Dict, f: Dict[str, np.ndarray]) -> None:
        """Orbits, ethmoid / sphenoid air, sphenoid wings, petrous pyramids with mastoid air cells, clivus, pons.

        Bone pieces are drawn as simple shapes, then blurred and thresholded against noise for organic edges.
        """
        h, u, xn, yn, inner, a, b = (self.head, ctx["u"], ctx["xn"], ctx["yn"], ctx["inner"], ctx["a"], ctx["b"])
        fine, wig = f["fine"], f["wig"]
        bone = np.zeros(self.x.shape, np.float32)
        air = np.zeros(self.x.shape, bool)
        front, wing, sph = _bell(u, -0.02, 0.3), _bell(u, 0.1, 0.3), _bell(u, -0.02, 0.24)
        pet, clivus, pons = _bell(u, 0.02, 0.24), _bell(u, -0.02, 0.14), _bell(u, -0.02, 0.32)
        cones = np.zeros(self.x.shape, bool)
        if front > 0:
            for side in (-1, 1):
                cones |= self._poly([(side * 0.2 * a, -0.55 * b), (side * 0.5 * h.A, -0.93 * h.B),
                                     (side * 0.16 * h.A, -0.93 * h.B)])
            walls = cv2.dilate(cones.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=max(1, int(2 / self.ps)))
            bone[(walls > 0) & ~cones] = 1
            if u < 0.1:
                bone[inner & (yn < -0.4)] = 1
            cells = self.ell(0, -0.8 * h.B, 0.09 * h.A, 0.25 * h.B)
            bone[cells] = 1
            air |= cells & (wig > -0.3)
            front_soft = inner & (yn < -0.55) & ~cones
            w[front_soft] = 35 + 4 * fine[front_soft]
        for side in (-1, 1):
            if wing > 0:
                bone[self._poly([(side * 0.12 * a, -0.4 * b), (side * 0.92 * a, -0.66 * b),
                                 (side * 0.92 * a, -0.54 * b), (side * 0.12 * a, -0.3 * b)])] = 1
            if pet > 0:
                bone[self._poly([(side * 0.2 * a, -0.04 * b), (side * 0.97 * a, 0.04 * b),
                                 (side * 0.92 * a, 0.34 * b)])] = 1
                mast = self.ell(side * 0.84, 0.3, 0.17 * pet, 0.15 * pet, scale=(a, b))
                air |= mast & (wig > 0.2)
        if sph > 0:
            bone[self.ell(0, -0.26, 0.22 * sph, 0.17 * sph, scale=(a, b))] = 1
            air |= self.ell(0, -0.28, 0.15 * sph, 0.11 * sph, scale=(a, b)) & (np.abs(self.x) > 0.8)
        if clivus > 0:
            bone[self.ell(0, -0.06, 0.1 * clivus, 0.13 * clivus, scale=(a, b))] = 1
        solid = (cv2.GaussianBlur(bone, (0, 0), 1.2 / self.ps) + 0.2 * wig > 0.5) & (inner | cones)
        w[solid] = (h.bone_hu * 0.85 + 90 * fine)[solid]
        w[air & (solid | ~inner)] = -950
        if pons > 0:
            cist = self.ell(0, 0.08, 0.21 * pons, 0.18 * pons, scale=(a, b)) & inner & ~solid
            w[cist] = h.csf
            st = self.ell(0, 0.1, 0.17 * pons, 0.15 * pons, scale=(a, b)) & inner & ~solid
            w[st] = h.white + 2 + fine[st]
        if front > 0:
            cones &= ~solid & ~air
            w[cones] = -85 + 5 * fine[cones]
            for side in (-1, 1):
                r = 11.5 * front
                globe = self.ell(side * 0.32 * h.A, -0.98 * h.B, r, r)
                w[globe] = 12 + 2 * fine[globe]
                w[self.ell(side * 0.32 * h.A, -0.98 * h.B - 0.8 * r, 3.5 * front, 1.5 * front)] = 95

    def _neck(self, w: np.ndarray, u: float, f: Dict[str, np.ndarray]) -> None:
        """Below the skull base: muscle / fat, mandible, maxillary sinuses, nasal airway, vertebra, spinal cord."""
        h, fine = self.head, f["fine"]
        s = _skin_scale(u)
        soft = self._rho(h.A * s, h.B * s) <= 0.92
        w[soft] = np.where(f["wig"][soft] > 0.9, -90.0, 52.0) + 4 * fine[soft]
        if u > -0.22:
            for side in (-1, 1):
                w[self.ell(side * 0.3 * h.A, -0.62 * h.B, 0.19 * h.A, 0.2 * h.B)] = -960
            w[self.ell(0, -0.85 * h.B, 0.06 * h.A, 0.22 * h.B) & (np.abs(self.x) > 0.8)] = -960
        else:
            mand = self.ell(0, -0.45 * h.B, 0.72 * h.A * s, 0.62 * h.B * s) & (self.y < -0.3 * h.B)
            mand &= ~self.ell(0, -0.42 * h.B, 0.72 * h.A * s - 6, 0.62 * h.B * s - 6)
            w[mand] = h.bone_hu
            w[self.ell(0, -0.12 * h.B, 8, 6)] = -990
        vert = self.ell(0, 0.12 * h.B, 15, 13)
        w[vert] = 700 + 80 * fine[vert]
        w[self.ell(0, 0.2 * h.B, 7, 6)] = 35

    def _mimics(self, w: np.ndarray, ctx: Dict) -> None:
        """Negative look-alikes: pineal / choroid plexus calcification, bone-adjacent hyperdense partial volume."""
        h, u, xn, yn = self.head, ctx["u"], ctx["xn"], ctx["yn"]
        a, b, inner = ctx["a"], ctx["b"], ctx["inner"]
        if h.pineal_hu and 0.36 < u < 0.45:
            w[self.ell(0, 0.17 * b, 2.5, 2.5)] = h.pineal_hu
        if h.choroid_hu and 0.46 < u < 0.56:
            for side in (-1, 1):
                w[self.ell(side * 0.18 * a, 0.27 * b, 2.0, 2.5)] = h.choroid_hu
        for ub, tb, r, val in h.blobs:
            dz = abs(u - ub) * h.H
            if dz < r + 2.0:
                rr = math.sqrt(max(r * r - max(0.0, dz - 2.0) ** 2, 1.0))
                ct, st = math.cos(tb), math.sin(tb)
                rad = 1 - (rr + 0.5) / math.hypot(a * ct, b * st)
                blob = self.ell(rad * a * ct, rad * b * st, rr, rr) & inner
                w[blob] = val

    def bleed(self, bl: Bleed, ctx: Dict, g: float) -> Optional[Tuple[np.ndarray, Optional[np.ndarray]]]:
        """Soft masks (core, oedema rim or None) of bleed `bl` on this slice at size factor g in (0, 1]."""
        if ctx["inner"] is None:
            return None
        inner, depth, ps = ctx["inner"], ctx["depth"], self.ps
        if bl.kind in ("epidural", "subdural"):
            th0, half, thick = bl.p
            half *= 0.6 + 0.4 * g
            dth = np.abs((self.th - th0 + np.pi) % (2 * np.pi) - np.pi) / half
            prof = np.clip(1 - dth ** (2 if bl.kind == "epidural" else 4), 0, 1)
            lim = thick * g * (prof if bl.kind == "epidural" else np.sqrt(prof))
            core = np.clip((lim - depth) / ps + 0.5, 0, 1) * (prof > 0) * (depth > -0.5 * ps)
            return core.astype(np.float32), None
        if bl.kind == "subarachnoid":
            return self._sah(bl, ctx, g), None
        if bl.kind == "intraparenchymal":
            xn, yn, rad, oed, _ = bl.p
            h = self.head
            dist = np.sqrt((self.x - xn * 0.7 * h.A) ** 2 + (self.y - yn * 0.7 * h.B) ** 2)
            reff = rad * g * (1 + 0.15 * ctx["n1"] + 0.12 * ctx["wig"])
            keep = (depth > 2.0).astype(np.float32)
            core = np.clip((reff - dist) / ps + 0.5, 0, 1) * keep
            rim = np.clip((reff + oed * g - dist) / ps + 0.5, 0, 1) * keep - core
            return core.astype(np.float32), rim.astype(np.float32)
        level, side = bl.p
        m = ctx["vent"] & (ctx["yn"] > level)
        if side:
            m &= np.sign(self.x) == side
        return m.astype(np.float32), None

    def _sah(self, bl: Bleed, ctx: Dict, g: float) -> np.ndarray:
        """Blood in sulci of a convexity sector, or in the basal cisterns and Sylvian fissures."""
        variant, th0, half = bl.p
        inner, depth, xn, yn = ctx["inner"], ctx["depth"], ctx["xn"], ctx["yn"]
        if variant == 0:
            dth = np.abs((self.th - th0 + np.pi) % (2 * np.pi) - np.pi)
            sector = dth < half * (0.5 + 0.5 * g)
            lines = (ctx["cs"] > 1 - 0.22) & (depth < ctx["sd"] + 2)
            m = sector & inner & (lines | (depth < 1.6)) & (depth > -0.3)
        else:
            wig = ctx["wig"]
            r = np.sqrt((xn / 0.26) ** 2 + ((yn - 0.04) / 0.22) ** 2) * (1 + 0.12 * np.cos(5 * self.th + th0))
            ring = (np.abs(r - 1) < 0.16 * (0.6 + 0.4 * g) * (1 + 0.5 * wig)) & (wig > -0.8)
            ax = np.abs(xn)
            syl = (ax > 0.28) & (ax < 0.9) & (np.abs(yn + 0.12 - 0.3 * (1 - ax) + 0.05 * wig) < 0.03 * (1 + 0.4 * wig))
            lines = (ctx["cs"] > 1 - 0.22) & (depth < ctx["sd"]) & (np.abs(yn + 0.1) < 0.35)
            m = inner & (ring | syl | lines & (ax > 0.5)) & (depth > 0.5) & ~ctx["vent"]
        return m.astype(np.float32)

    def composite(self, hu: np.ndarray, core: np.ndarray, rim: Optional[np.ndarray], frac: float, bl: Bleed,
                  fine: np.ndarray) -> None:
        """Blend a bleed (and its oedema rim) into `hu` in place at contrast fraction `frac` (partial volume)."""
        w = hu[self.win]
        m = frac * core
        w *= 1 - m
        w += m * (bl.hu + 3 * fine)
        if rim is not None:
            r = frac * np.clip(rim, 0, 1)
            w *= 1 - r
            w += r * bl.p[4]

    def finish(self, hu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Partial-volume blur, area-average to the output matrix, add correlated noise -> float32 HU (rows, cols)."""
        out = cv2.GaussianBlur(hu, (0, 0), self.psf)
        if self.f > 1:
            out = cv2.resize(out, (self.pose.cols, self.pose.rows), interpolation=cv2.INTER_AREA)
        noise = cv2.GaussianBlur(rng.standard_normal(out.shape, dtype=np.float32), (0, 0), NOISE_BLUR)
        out += noise * np.float32(self.pose.noise_sd / _NOISE_STD)
        return out

    def to_output(self, mask: np.ndarray) -> np.ndarray:
        """A window-level soft mask -> output-matrix mask (area-averaged), float32 (rows, cols)."""
        full = np.zeros((self.pose.rows * self.f, self.pose.cols * self.f), np.float32)
        full[self.win] = mask
        if self.f > 1:
            full = cv2.resize(full, (self.pose.cols, self.pose.rows), interpolation=cv2.INTER_AREA)
        return full


def _blurred_noise_std(sigma: float = NOISE_BLUR) -> float:
    """Std of unit white noise after cv2.GaussianBlur(sigma), so the final noise has the requested std."""
    k = cv2.getGaussianKernel(int(round(sigma * 8 + 1)) | 1, sigma)[:, 0]  # the size cv2 picks for float32
    return float((k ** 2).sum())


_NOISE_STD = _blurred_noise_std()

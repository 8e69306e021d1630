"""
Turn datasets into summary.jsonl (the format data.py reads at run time; see README "Your data"):

    python prepare.py demo OUT_DIR [--cases K] [--seed S]         # synthetic BraTS-like phantoms
    python prepare.py brats SRC_DIR OUT_DIR [--views axial,coronal] [--negatives R]  # NIfTI cases
        [--context-slices C]                                      # + the neighbours, as colour
    python prepare.py masks SRC_DIR OUT_DIR [--cases cases.csv]   # image + mask pairs

Read top to bottom: writing jsonl and a contact sheet to check it by eye, the synthetic demo,
reading and writing NIfTI volumes, and studies (read_study, with head_region for a scan that has
neither a brain mask nor a zero background; view_slice, slice_image, volume_box: sample.py --volume
answers a whole study through these, so its slices are the converter's pictures), the BraTS
converter, the image + mask converter, then the command line. Like nanoGPT's data/*/prepare.py, this
runs once per dataset; train.py and sample.py only read its output.

This file imports data.py, and config.py for DataError.
"""
import argparse
import csv
import gzip
import io
import json
import math
import os
import re
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import data
from config import DataError

# BraTS 2023 names: FLAIR, T2, native T1, post-contrast T1. The index is the last number in names.
MODALITIES = ("t2f", "t2w", "t1n", "t1c")
VIEWS = ("axial", "coronal", "sagittal")  # the index is the middle number in file names


# -----------------------------------------------------------------------------
# writing datasets

def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_split(folder, rows, cases, val_fraction, seed):
    """summary.jsonl (all rows), train.jsonl and val.jsonl (split by patient: cases[i] is row i's)
    and a contact sheet in folder. Returns the validation cases."""
    val = data.val_cases(cases, val_fraction, seed)
    write_jsonl(folder / "summary.jsonl", rows)
    write_jsonl(folder / "train.jsonl", [r for r, c in zip(rows, cases) if c not in val])
    write_jsonl(folder / "val.jsonl", [r for r, c in zip(rows, cases) if c in val])
    if rows:
        write_contact_sheet(folder / "summary.jsonl", folder / "contact_sheet.png")
    return val


def write_contact_sheet(jsonl_path, png_path, max_rows=12, tile=128):
    """A PNG grid to check a dataset by eye: one row per sample (evenly spread over the file), one
    column per modality, boxes in red."""
    modalities, samples = data.read_summary(jsonl_path, require_boxes=False, check_images=False)
    n = min(max_rows, len(samples))
    picks = [samples[round(i * (len(samples) - 1) / max(1, max_rows - 1))] for i in range(n)]
    head = 14
    sheet = Image.new("RGB", (tile * len(modalities), head + tile * len(picks)))
    draw = ImageDraw.Draw(sheet)
    for j, m in enumerate(modalities):
        draw.text((j * tile + 3, 1), m, fill=(255, 255, 0))
    for i, s in enumerate(picks):
        W, H = s.size
        for j, p in enumerate(s.paths):
            with Image.open(p) as im:
                picture = im.convert("RGB").resize((tile, tile), Image.BICUBIC)
            left, top = j * tile, head + i * tile
            sheet.paste(picture, (left, top))
            for b in s.boxes:
                x0, y0, x1, y1 = b[0] * tile / W, b[1] * tile / H, b[2] * tile / W, b[3] * tile / H
                corners = [left + x0, top + y0, left + x1 - 1, top + y1 - 1]
                draw.rectangle(corners, outline=(255, 0, 0))
        draw.text((2, head + i * tile + tile - 12), Path(s.paths[0]).stem[:-2], fill=(0, 255, 0))
    sheet.save(png_path)
    return png_path


def mask_box(mask):
    """Tumour mask (H, W) -> the jsonl box that covers its pixels: pixel-edge [x0, y0, x1, y1]
    written in the summary.jsonl corner order (data.box_to_output)."""
    ys, xs = np.nonzero(mask)
    edges = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    return data.box_to_output(edges, "corners")


def gray_jpeg(u8):
    """A grey uint8 image (H, W) -> JPEG bytes, quality 95: every slice picture this file writes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(u8), mode="L").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# -----------------------------------------------------------------------------
# demo dataset: synthetic BraTS-like slices of a phantom brain, by numpy in milliseconds a slice.

# Tissue classes of the phantom and their relative signal in each modality (t2f, t2w, t1n, t1c): CSF
# is bright on T2 and dark on FLAIR (fluid suppressed) and T1; white matter is brighter than grey on
# T1 and darker on T2/FLAIR; oedema is bright on FLAIR and T2; the enhancing rim lights up after
# contrast (t1c); the necrotic core is dark on T1 and bright on T2.
BACKGROUND, CSF, GM, WM, DEEP_GM, OEDEMA, RIM, NECROSIS = range(8)
_SIGNAL = np.array([
    [0.00, 0.00, 0.00, 0.00],  # background (skull-stripped)
    [0.10, 1.00, 0.16, 0.18],  # CSF
    [0.60, 0.62, 0.50, 0.52],  # grey matter
    [0.45, 0.38, 0.72, 0.73],  # white matter
    [0.55, 0.52, 0.58, 0.60],  # deep grey matter (basal ganglia, thalamus)
    [0.95, 0.82, 0.45, 0.47],  # oedema
    [0.75, 0.62, 0.50, 1.05],  # enhancing tumour rim
    [0.50, 0.92, 0.22, 0.24],  # necrotic core
], dtype=np.float32)


def _blur(img, sigma):
    """Gaussian blur by FFT (the images have black borders, so wrap-around does not show)."""
    fy = np.fft.fftfreq(img.shape[0])[:, None]
    fx = np.fft.rfftfreq(img.shape[1])[None, :]
    gauss = np.exp(-2 * np.pi ** 2 * sigma ** 2 * (fx ** 2 + fy ** 2))  # its Fourier transform
    return np.fft.irfft2(np.fft.rfft2(img) * gauss, s=img.shape)


def _smooth_noise(rng, S, sigma):
    n = _blur(rng.standard_normal((S, S)), sigma)
    return n / (n.std() + 1e-8)


def _harmonics(rng, kmax, amp):
    """A random smooth closed outline: radius factor as a function of angle (a 1024-entry table)."""
    k = np.arange(2, kmax + 1)
    a, ph = rng.normal(0, amp, len(k)) / np.sqrt(k - 1), rng.uniform(0, 2 * np.pi, len(k))
    t = np.linspace(-np.pi, np.pi, 1024, endpoint=False)
    table = (1 + (a * np.cos(k * t[:, None] + ph)).sum(-1)).astype(np.float32)
    return lambda ang: table[((ang + np.pi) * (1024 / (2 * np.pi))).astype(np.int64) % 1024]


def _phantom_case(rng, S, n_slices):
    """One patient: yields labels (S, S) for n_slices axial slices through its tumour (which grows
    and shrinks from slice to slice, as a spheroid cut at different heights)."""
    cx, cy = S / 2 + rng.normal(0, 0.015 * S), S / 2 + rng.normal(0, 0.015 * S)
    ax, ay = rng.uniform(0.32, 0.37) * S, rng.uniform(0.40, 0.45) * S  # half width, half length
    tilt = rng.uniform(-0.12, 0.12)
    outline, depth = _harmonics(rng, 6, 0.03), _harmonics(rng, 9, 0.5)
    twist = _harmonics(rng, 7, 1.5)
    gyri_n, gyri_ph = rng.integers(15, 22), rng.uniform(0, 2 * np.pi)
    wobble = _harmonics(rng, 7, 1.2)
    vent_size = rng.uniform(0.7, 1.4)
    # tumour: centre in one hemisphere, core radius, oedema reach, necrotic part, irregular outlines
    side = rng.choice([-1, 1])
    tp, tq = side * rng.uniform(0.15, 0.55) * ax, rng.uniform(-0.55, 0.55) * ay
    rt = rng.uniform(0.05, 0.13) * S
    re_ = rt * rng.uniform(1.3, 2.0)
    nec = rng.uniform(0.0, 0.65)
    t_out, e_out = _harmonics(rng, 5, 0.12), _harmonics(rng, 7, 0.12)
    n_out = _harmonics(rng, 4, 0.12)
    e_field = _smooth_noise(rng, S, S / 14)  # lobulated edges
    t_field = _smooth_noise(rng, S, S / 20)
    zt, rzt = rng.uniform(-0.25, 0.35), rng.uniform(0.15, 0.3)
    drift = rng.normal(0, 0.08 * S, 2)  # the tumour's centre moves a little from slice to slice
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    c, s_ = np.cos(tilt), np.sin(tilt)
    # the brain's frame: p left-right, q front-back
    p, q = c * (xx - cx) + s_ * (yy - cy), -s_ * (xx - cx) + c * (yy - cy)
    th = np.arctan2(q / ay, p / ax)
    r_outline = outline(th) + 0.05 * np.sin(th)  # egg-shaped: narrower in front
    psi0 = gyri_n * th + gyri_ph + wobble(th)
    for z in zt + rzt * np.linspace(-0.75, 0.75, n_slices):
        sc = np.sqrt(max(0.2, 1 - (z / 1.1) ** 2))  # the brain narrows away from its middle
        rho = np.hypot(p / (ax * sc), q / (ay * sc)) / r_outline
        lab = np.full((S, S), WM, np.int64)
        psi = psi0 + twist(th) * (rho - 0.85) * 6  # sulci curve instead of running straight inwards
        fold = np.cos(psi)
        lab[rho > 0.81 + 0.06 * fold * np.clip(depth(th), 0.3, 1.7)] = GM  # cortex folded in gyri
        lab[(rho > 0.70 + 0.1 * depth(th + 1)) & (fold < -0.95)] = CSF  # sulci
        lab[rho > 0.965] = CSF  # thin CSF around the brain
        lab[(np.abs(p) < 0.04 * S) & (np.abs(q) > 0.3 * ay * sc)] = GM  # medial cortex
        lab[(np.abs(p) < 0.012 * S) & (np.abs(q) > 0.3 * ay * sc)] = CSF  # interhemispheric fissure
        v = max(0.0, 1 - (z / 0.5) ** 2) * vent_size
        if v > 0.05:
            for sgn in (-1, 1):  # deep grey nuclei, then the lateral ventricles' butterfly
                ex, ey = (p - sgn * 0.14 * S) / (0.06 * S), (q - 0.03 * S) / (0.1 * S)
                lab[ex ** 2 + ey ** 2 < min(1, v)] = DEEP_GM
                wy = 0.2 * S * min(1.0, v) + 1
                off = sgn * (0.04 * S + 0.05 * S * (q / wy) ** 2)
                lab[((p - off) / (0.028 * S * v + 0.5)) ** 2 + ((q + 0.02 * S) / wy) ** 2 < 1] = CSF
        brain = rho < 1
        # tumour at this level: radii shrink towards its top and bottom, outlines are lobulated
        ft = np.sqrt(max(0.0, 1 - ((z - zt) / rzt) ** 2))
        fe = np.sqrt(max(0.0, 1 - ((z - zt) / (1.4 * rzt)) ** 2))
        d = (z - zt) / rzt
        dp, dq = p - tp - d * drift[0], q - tq - d * drift[1]
        r, a = np.hypot(dp, dq), np.arctan2(dq, dp)
        lab[brain & (r / (re_ * fe * e_out(a) + 1e-6) + 0.3 * np.clip(e_field, -1, 1) < 1)] = OEDEMA
        lab[brain & (r / (rt * ft * t_out(a) + 1e-6) + 0.12 * t_field < 1)] = RIM
        lab[brain & (r < nec * rt * ft * n_out(a))] = NECROSIS
        lab[~brain] = BACKGROUND
        yield lab


def _render(rng, lab, S, contrast):
    """Labels -> 4 uint8 images (t2f, t2w, t1n, t1c): tissue signal, texture, partial volume blur,
    patchy enhancement, smooth bias field and Rician noise, then windowed to 0..255."""
    brain = lab != BACKGROUND
    out = []
    texture = _smooth_noise(rng, S, S / 40)
    patches = _smooth_noise(rng, S, S / 30)
    yy, xx = np.mgrid[-1:1:S * 1j, -1:1:S * 1j]
    inside = _blur(brain.astype(np.float64), 0.8) > 0.05
    tumour = (lab == RIM) | (lab == NECROSIS) | (lab == OEDEMA)
    for m in range(4):
        img = (_SIGNAL[:, m] * contrast[:, m])[lab]
        img = img * (1 + 0.04 * texture)
        img = np.where(tumour, img * (1 + 0.12 * patches), img)  # tumours are heterogeneous
        img = _blur(img, 0.7)  # partial volume at tissue borders
        a = rng.normal(0, 0.25, 5)
        bias = a[0] * xx + a[1] * yy + a[2] * xx * yy + a[3] * xx ** 2 + a[4] * yy ** 2
        img *= np.exp(0.5 * bias)  # smooth bias field
        sigma = 0.03
        real, imag = img + rng.normal(0, sigma, img.shape), rng.normal(0, sigma, img.shape)
        img = np.hypot(real, imag)  # Rician noise: the magnitude of complex Gaussian noise
        img *= inside  # skull-stripped: black outside the brain
        hi = np.percentile(img[brain], 99.5)
        out.append(np.clip(img / hi * 235, 0, 255).astype(np.uint8))
    return out


def make_demo(out_dir, cases=60, slices_per_case=6, seed=0, size=128):
    """Write a synthetic BraTS-like dataset: out_dir/images/DEMO-<case>-000_<slice>_<mod>.jpg, a
    summary.jsonl (keys "<mod> Axial_path", whole-tumour boxes [[maxx, maxy, minx, miny]], the
    patient as "case") and contact_sheet.png. Deterministic for a seed. Returns the jsonl's path."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(cases):
        rng = np.random.default_rng([seed, k])
        case = f"DEMO-{k:05d}-000"
        contrast = rng.uniform(0.92, 1.08, _SIGNAL.shape)  # each patient's tissues differ a little
        for j, lab in enumerate(_phantom_case(rng, size, slices_per_case)):
            whole = (lab == OEDEMA) | (lab == RIM) | (lab == NECROSIS)
            if not whole.any():
                continue
            row = {}
            for m, img in zip(MODALITIES, _render(rng, lab, size, contrast)):
                name = f"images/{case}_{j}_{MODALITIES.index(m)}.jpg"
                (out_dir / name).write_bytes(gray_jpeg(img))
                row[f"{m} Axial_path"] = name
            row.update(box=[mask_box(whole)], case=case)
            rows.append(row)
    write_jsonl(out_dir / "summary.jsonl", rows)
    write_contact_sheet(out_dir / "summary.jsonl", out_dir / "contact_sheet.png")
    return out_dir / "summary.jsonl"


# -----------------------------------------------------------------------------
# BraTS converter. NIfTI-1 is read by a small reader of our own (gzip + struct + numpy, below)
# rather than nibabel: BraTS volumes are plain single-file NIfTI-1, ~60 lines cover them, and users
# need no extra (large) dependency to convert their data.

_NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4",
                 1024: "i8", 1280: "u8"}


@dataclass
class Grid:
    """How read_volume's RAS+ array maps back to its file: RAS axis a is the file's voxel axis
    axes[a], reversed where flipped[a]; affine maps the file's voxel indices (i, j, k, 1) to
    millimetres (the sform, else the qform, else the voxel sizes)."""
    shape: tuple  # the file's voxel shape
    axes: tuple
    flipped: tuple
    affine: np.ndarray  # (4, 4)
    header: bytes = b""  # the file's 348-byte NIfTI-1 header, which write_nifti keeps

    def to_file(self, box):
        """A box of the RAS array in voxel edges [x0, y0, z0, x1, y1, z1] -> the same voxels as
        edges of the file's voxel grid (what a viewer shows)."""
        lo, hi = [0] * 3, [0] * 3
        for a, i in enumerate(self.axes):
            b0, b1 = box[a], box[a + 3]
            lo[i], hi[i] = (self.shape[i] - b1, self.shape[i] - b0) if self.flipped[a] else (b0, b1)
        return lo + hi

    def to_mm(self, box):
        """A box of the file's voxel grid in edges -> [x0, y0, z0, x1, y1, z1] in world millimetres
        (the NIfTI affine maps voxel centres, so an edge e sits at index e - 0.5); axis-aligned in
        the world. Rounded to 0.1 mm, well under a voxel."""
        corners = np.array([[box[3 * u] - 0.5, box[1 + 3 * v] - 0.5, box[2 + 3 * w] - 0.5, 1.0]
                            for u in (0, 1) for v in (0, 1) for w in (0, 1)])  # (8, 4)
        mm = corners @ self.affine[:3].T  # (8, 3)
        return [round(float(v), 1) for v in np.concatenate([mm.min(0), mm.max(0)])]


def read_nifti(path):
    """A NIfTI-1 file (.nii or .nii.gz) -> volume float32 (X, Y, Z) in RAS+ order: index grows
    towards the patient's Right, Anterior, Superior, intensity scaling applied."""
    return read_volume(path)[0]


def read_volume(path):
    """read_nifti, and the Grid that maps the RAS+ array back to the file's voxels and to mm."""
    path = Path(path)
    try:
        raw = gzip.open(path).read() if path.name.endswith(".gz") else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # missing, unreadable, not gzip, cut short, bad
        raise DataError(f"{path}: cannot be read as a NIfTI file ({e})") from None
    if len(raw) < 352:
        raise DataError(f"{path}: too short for a NIfTI-1 file")
    e = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    if struct.unpack(e + "i", raw[:4])[0] != 348 or raw[344:347] != b"n+1":
        raise DataError(f"{path}: not a single-file NIfTI-1 image "
                        f"(NIfTI-2 and .hdr/.img pairs are not supported)")
    dim = struct.unpack(e + "8h", raw[40:56])
    dtype = struct.unpack(e + "h", raw[70:72])[0]
    if dtype not in _NIFTI_DTYPES:
        raise DataError(f"{path}: unsupported NIfTI datatype code {dtype}")
    if dim[0] > 3 and any(d > 1 for d in dim[4:dim[0] + 1]):
        raise DataError(f"{path}: a {dim[0]}-D image; expected one 3-D volume")
    pixdim = struct.unpack(e + "8f", raw[76:108])
    vox_offset = int(struct.unpack(e + "f", raw[108:112])[0])
    slope, inter = struct.unpack(e + "2f", raw[112:120])
    qform_code, sform_code = struct.unpack(e + "2h", raw[252:256])
    affine = np.eye(4)
    shape = tuple(max(1, d) for d in dim[1:4])
    count = shape[0] * shape[1] * shape[2]
    dt = np.dtype(e + _NIFTI_DTYPES[dtype])
    if len(raw) < vox_offset + count * dt.itemsize:
        raise DataError(f"{path}: truncated: {len(raw)} bytes hold fewer than the {shape} voxels "
                        f"of its header")
    data = np.frombuffer(raw, dt, count, vox_offset).reshape(shape, order="F")  # x fastest
    if slope not in (0.0, 1.0) or inter != 0.0:  # scl_slope 0 means "no scaling"
        data = data.astype(np.float64) * (slope if slope else 1.0) + inter
    data = data.astype(np.float32)
    # voxel axes -> world (RAS+) directions: the sform if set, else the qform, else the identity
    if sform_code > 0:
        affine[:3] = np.array(struct.unpack(e + "12f", raw[280:328]), np.float64).reshape(3, 4)
        rot = affine[:3, :3]
    elif qform_code > 0:
        b, c, d = struct.unpack(e + "3f", raw[256:268])
        a = math.sqrt(max(0.0, 1 - b * b - c * c - d * d))
        rot = np.array([[a*a + b*b - c*c - d*d, 2*(b*c - a*d), 2*(b*d + a*c)],
                        [2*(b*c + a*d), a*a + c*c - b*b - d*d, 2*(c*d - a*b)],
                        [2*(b*d - a*c), 2*(c*d + a*b), a*a + d*d - c*c - b*b]])
        rot[:, 2] *= -1 if pixdim[0] < 0 else 1  # qfac
        affine[:3, :3] = rot * np.array(pixdim[1:4])
        affine[:3, 3] = struct.unpack(e + "3f", raw[268:280])  # qoffset
    else:
        rot = np.eye(3)
        affine[:3, :3] = np.diag([p or 1.0 for p in pixdim[1:4]])
    world = np.abs(rot).argmax(0)  # which world axis each voxel axis runs along
    if sorted(world) != [0, 1, 2]:
        raise DataError(f"{path}: oblique orientation; cannot tell which axis is which")
    for i in range(3):
        if rot[world[i], i] < 0:
            data = np.flip(data, i)
    axes = tuple(int(i) for i in np.argsort(world))  # RAS axis a is voxel axis axes[a]
    grid = Grid(shape, axes, tuple(bool(rot[world[i], i] < 0) for i in axes), affine, raw[:348])
    return np.ascontiguousarray(data.transpose(axes)), grid  # (R, A, S)


def write_nifti(path, vol, grid, description=""):
    """A RAS+ volume as read_volume returns it (uint8, int16 or float32) -> a NIfTI-1 file on the
    study's own grid (gzipped when path ends in .gz): the voxels back in the file's order and the
    file's own header, so the sform and qform (codes, quaternion, voxel sizes) are the study's and a
    viewer (ITK-SNAP, 3D Slicer) overlays the volume on it; only the data's fields change: 3-D, the
    datatype, no intensity scaling, the description."""
    assert len(grid.header) == 348, "a Grid from read_volume"
    codes = {np.dtype(t): c for c, t in _NIFTI_DTYPES.items() if t in ("u1", "i2", "f4")}
    code = codes[vol.dtype]
    stored = vol.transpose(np.argsort(grid.axes))  # RAS axis a back to the file's axis axes[a]
    for a, i in enumerate(grid.axes):
        if grid.flipped[a]:
            stored = np.flip(stored, i)
    assert stored.shape == tuple(grid.shape)
    h = bytearray(grid.header)
    e = "<" if struct.unpack("<i", h[:4])[0] == 348 else ">"
    struct.pack_into(e + "8h", h, 40, 3, *stored.shape, 1, 1, 1, 1)
    struct.pack_into(e + "2h", h, 70, code, vol.dtype.itemsize * 8)  # datatype, bitpix
    struct.pack_into(e + "f", h, 108, 352.0)  # vox_offset: the header, then 4 bytes: no extension
    struct.pack_into(e + "2f", h, 112, 1.0, 0.0)  # scl_slope, scl_inter
    struct.pack_into(e + "2f", h, 124, float(vol.max()), float(vol.min()))  # cal_max, cal_min
    h[148:228] = description.encode("ascii")[:79].ljust(80, b"\0")
    h[344:348] = b"n+1\0"
    raw = bytes(h) + bytes(4) + stored.astype(vol.dtype.newbyteorder(e)).tobytes(order="F")
    path = Path(path)
    path.write_bytes(gzip.compress(raw, 6, mtime=0) if path.name.endswith(".gz") else raw)


def view_slice(vol, view, k):
    """An upright 2-D slice of a RAS+ volume, radiological convention (the patient's right on the
    image's left): axial with the nose up, coronal and sagittal with the top of the head up (and
    sagittal facing left)."""
    if view == "axial":
        return vol[::-1, ::-1, k].T  # rows: anterior -> posterior
    if view == "coronal":
        return vol[::-1, k, ::-1].T  # rows: superior -> inferior
    return vol[k, ::-1, ::-1].T  # sagittal; columns: anterior -> posterior


def _window(vol, brain, lo_pct=0.5, hi_pct=99.5):
    """Intensities -> uint8 by percentiles inside the brain (robust to any scale: int, float,
    z-scored); black outside the brain."""
    lo, hi = np.percentile(vol[brain], [lo_pct, hi_pct])
    out = np.clip((vol - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    return np.where(brain, out, 0).astype(np.uint8)


VIEW_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}  # the RAS axis that a view's slices cut
# a slice with less brain than this share of the study's largest section shows background
MIN_BRAIN_SHARE = 0.05


# A study without a brain mask whose background is not 0 (a scan as it leaves the scanner: skull on,
# noise in the air around the head; or z-scored data): head_region finds the head in the study.
HEAD_SEPARABILITY = 0.8  # Otsu's separability of a head from its air; noise alone: 0.64-0.75
BACKGROUND_SPREADS = 8  # the head starts this many spreads of the air's noise above its mode


def _shift(m):
    """A bool array moved one place along its last axis: m[..., i - 1] at i, False at 0."""
    out = np.zeros_like(m)
    out[..., 1:] = m[..., :-1]
    return out


def _components(mask, across):
    """Connected components of a bool array (A, B, N), from its runs along the last axis: two runs
    join where they share a column in neighbouring lines along an axis of `across` ((0, 1): 3-D,
    6-neighbour; (1,): each 2-D slice mask[a] on its own). -> (component of each voxel, meaningful
    inside the mask; the components' sizes in voxels). Union-find in numpy: each pass hooks every
    component onto the smallest label it touches, then follows the pointers to their roots; a
    240 x 240 x 155 volume takes under a second, noise included."""
    run = np.cumsum(mask & ~_shift(mask), dtype=np.int32).reshape(mask.shape) - 1  # (A, B, N)
    n = int(run.max()) + 1
    if n == 0:
        return np.zeros(mask.shape, np.int32), np.zeros(0, np.int64)
    a, b = [], []  # pairs of touching runs
    for axis in across:
        lo = (slice(None),) * axis + (slice(None, -1),)
        hi = (slice(None),) * axis + (slice(1, None),)
        both = mask[lo] & mask[hi]
        first = both & ~_shift(both)  # one voxel per stretch where two runs overlap
        a.append(run[lo][first])
        b.append(run[hi][first])
    a, b = np.concatenate(a), np.concatenate(b)
    label = np.arange(n, dtype=np.int32)  # each run's pointer; a root points at itself
    while True:
        low = np.minimum(label[a], label[b])
        hooked = label.copy()
        np.minimum.at(hooked, label[a], low)
        np.minimum.at(hooked, label[b], low)
        while not np.array_equal(up := hooked[hooked], hooked):
            hooked = up
        if np.array_equal(hooked, label):
            break
        label = hooked
    sizes = np.bincount(label, weights=np.bincount(run[mask], minlength=n), minlength=n)
    return label[run], sizes.astype(np.int64)


def head_region(vols, path):
    """The head in a study without a brain mask and with a background that is not 0 (vols: its
    modalities, RAS) -> bool (X, Y, Z). path names the study in errors.

    Each modality is scaled by its own 1st and 99th percentiles, so that they weigh alike, and the
    modalities are averaged. Otsu's threshold on that average's histogram splits the air from the
    tissue. It falls inside the tissue's range when the air is a narrow peak (z-scored data: one
    value), cutting dark tissue off, so the air's own noise sets the threshold used where lower:
    the air's mode plus BACKGROUND_SPREADS times its spread below the mode (Rician noise passes
    that in 5e-5 of the air's voxels). Below it, what does not reach the border of its slice
    (ventricles, dark bone, the gap under the skull) is filled on every slice of the three views,
    which joins the skull to the brain inside it, and the largest 6-connected region left is the
    head. ~2 s for a 240 x 240 x 155 study.

    A study where no head stands out is a DataError: every voxel alike, a histogram without an air
    peak apart from the tissue (Otsu's separability under HEAD_SEPARABILITY: noise, or no air
    around the head), no region with most of the voxels above the air, or a region over 90% of
    the volume."""
    scaled = []
    for v in vols:
        lo, hi = np.percentile(v, [1, 99])
        lo, hi = (lo, hi) if hi > lo else (v.min(), v.max())
        if hi > lo:
            scaled.append(np.clip((v - lo) / (hi - lo), 0, 1, dtype=np.float32))
    if not scaled:
        raise DataError(f"{path}: every voxel holds one value; there is no head to find")
    x = np.mean(scaled, 0)  # (X, Y, Z) in [0, 1]
    bins = np.minimum((x * 256).astype(np.int32), 255)
    p = np.bincount(bins.ravel(), minlength=256) / x.size
    w, mu = np.cumsum(p), np.cumsum(p * np.arange(256))  # the air's share and its summed bins
    between = (mu[-1] * w - mu) ** 2 / np.maximum(w * (1 - w), 1e-12)  # Otsu: between-class var.
    t = int(between.argmax())  # bins 0..t are air
    separability = between[t] / max((p * (np.arange(256) - mu[-1]) ** 2).sum(), 1e-12)
    if separability < HEAD_SEPARABILITY:
        raise DataError(f"{path}: its intensities do not split into air and head (Otsu's "
                        f"separability {separability:.2f} < {HEAD_SEPARABILITY}: noise, or no air "
                        f"around the head); give its brain mask (<case>-brainmask.nii.gz)")
    mode = int(p[:t + 1].argmax())
    air = np.median(x[bins == mode])
    spread = np.sqrt(np.mean((air - x[x <= air]) ** 2))  # below the mode: air only
    cut = min((t + 1) / 256, max(air + BACKGROUND_SPREADS * spread, (mode + 1) / 256))
    head = x >= cut
    for order in ((2, 1, 0), (1, 2, 0), (0, 2, 1)):  # axial, coronal, sagittal slices
        out = np.ascontiguousarray(~head.transpose(order))  # (slices, rows, columns)
        label, sizes = _components(out, (1,))
        border = np.zeros(out.shape, bool)
        border[:, [0, -1]], border[:, :, [0, -1]] = True, True
        open_ = np.zeros(len(sizes), bool)
        open_[label[out & border]] = True  # background that reaches the slice's border
        head |= (out & ~open_[label]).transpose(np.argsort(order))
    head = np.ascontiguousarray(head.transpose(2, 1, 0))  # (Z, Y, X): runs along x
    label, sizes = _components(head, (0, 1))
    if sizes.max() < 0.5 * sizes.sum():
        raise DataError(f"{path}: no one head stands out: the largest region above the air's "
                        f"level holds {sizes.max() / sizes.sum():.0%} of its voxels (noise?); "
                        f"give its brain mask (<case>-brainmask.nii.gz)")
    head = ((label == sizes.argmax()) & head).transpose(2, 1, 0)
    if head.mean() > 0.9:
        raise DataError(f"{path}: the head found covers {head.mean():.0%} of the volume, leaving "
                        f"no air around it; give its brain mask (<case>-brainmask.nii.gz)")
    return head


def case_file(folder, name):
    """<folder>/<folder name>-<name>.nii.gz (or .nii) when it exists, else None."""
    folder = Path(folder)
    files = (folder / f"{folder.name}-{name}.nii.gz", folder / f"{folder.name}-{name}.nii")
    return next((p for p in files if p.is_file()), None)


def read_study(paths, brainmask=None):
    """The modality volumes of one study -> (uint8 RAS volumes windowed inside the brain, brain
    (bool RAS), the first file's Grid). The converter and sample.py --volume both read studies here,
    so a slice is the same picture in training and in answering. The brain is the brain mask when
    given, else the voxels nonzero in any modality (BraTS: skull-stripped, background 0), else,
    where that is nearly every voxel (a scan with its skull and the air's noise, or z-scored data),
    the head that head_region finds: windowed inside it and its slices answered, as a brain's."""
    if not paths:
        raise DataError("a study needs at least one modality volume")
    read = [read_volume(p) for p in paths]
    vols = [v for v, _ in read]
    if len({v.shape for v in vols}) > 1:
        raise DataError("volumes of one study must have one shape, got "
                        + ", ".join(f"{Path(p).name} {v.shape}" for p, v in zip(paths, vols)))
    if brainmask is not None:
        brain = read_nifti(brainmask) > 0
        if brain.shape != vols[0].shape:
            raise DataError(f"{brainmask}: brain mask of shape {brain.shape}, "
                            f"the volumes are {vols[0].shape}")
    else:
        brain = np.any([v != 0 for v in vols], 0)
        if brain.mean() > 0.9:  # no zero background
            brain = head_region(vols, paths[0])
    if not brain.any():
        raise DataError(f"{brainmask or paths[0]}: every voxel is zero")
    return [_window(v, brain) for v in vols], brain, read[0][1]


def brain_slices(brain, view):
    """-> bool per slice of the view: True where it shows brain (MIN_BRAIN_SHARE of the largest)."""
    area = brain.sum(tuple(a for a in range(3) if a != VIEW_AXIS[view]))
    return area >= MIN_BRAIN_SHARE * area.max()


def slice_image(volume, view, k, context=0):
    """Slice k of a windowed uint8 volume in a view -> the converter's image file as bytes.

    context 0: a grey JPEG of the slice. context c > 0: an RGB PNG whose red, green and blue are
    slices k - c, k and k + c (the first or last slice repeated past the volume's ends), so one
    image shows the model whether the tumour goes on above and below: the few-pixel sections at a
    tumour's ends sit next to larger ones. PNG, because JPEG would blur the colour (the
    differences between the slices) at half resolution."""
    if context == 0:
        return gray_jpeg(view_slice(volume, view, k))
    n = volume.shape[VIEW_AXIS[view]]
    rgb = np.stack([view_slice(volume, view, min(max(k + d, 0), n - 1))
                    for d in (-context, 0, context)], -1)  # (H, W, 3)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def volume_box(box, view, k, shape):
    """A pixel box [x0, y0, x1, y1] (edges) on slice k of a view, as view_slice draws it, of a RAS
    volume of shape (X, Y, Z) -> the same voxels as RAS edges [x0, y0, z0, x1, y1, z1]. Image
    columns and rows run against the RAS axes (see view_slice), so an edge e becomes n - e."""
    X, Y, Z = shape
    c0, r0, c1, r1 = box
    if view == "axial":  # columns: x reversed, rows: y reversed
        return [X - c1, Y - r1, k, X - c0, Y - r0, k + 1]
    if view == "coronal":  # columns: x reversed, rows: z reversed
        return [X - c1, k, Z - r1, X - c0, k + 1, Z - r0]
    return [k, Y - c1, Z - r1, k + 1, Y - c0, Z - r0]  # sagittal: columns y, rows z reversed


def image_box(box, view, shape):
    """volume_box's way back: RAS edges [x0, y0, z0, x1, y1, z1] -> the pixel box [x0, y0, x1, y1]
    that the box covers on any slice of the view."""
    X, Y, Z = shape
    x0, y0, z0, x1, y1, z1 = box
    if view == "axial":
        return [X - x1, Y - y1, X - x0, Y - y0]
    if view == "coronal":
        return [X - x1, Z - z1, X - x0, Z - z0]
    return [Y - y1, Z - z1, Y - y0, Z - z0]


def convert_brats(src, out, views=("axial",), min_tumor_px=100, negatives=0.0, val_fraction=0.2,
                  seed=0, context=0, log=print):
    """BraTS case folders `<case>/<case>-<mod>.nii.gz` -> JPEG (or PNG) slices and jsonl rows
    (README, "Your data").

    Keeps slices with at least min_tumor_px whole-tumour pixels (seg > 0), and with negatives R > 0
    also round(R * that many) slices without any tumour pixel, "box": [], spread evenly over the
    slices that show brain, or head (read_study, brain_slices: not the air above and below it).
    Images are out/images/<case>_<viewindex>-<slice>_<modindex>.jpg (view index in VIEWS, modality
    index in the row's key order); with context C > 0, .png pictures of slices k - C, k, k + C as
    colours (slice_image), and every row says "context_slices": C (data.context_slices), so that
    train.py records it and sample.py --volume draws its slices the same way. Each row names its
    patient, the case folder, as "case". Writes summary.jsonl (all rows), train.jsonl and val.jsonl
    (split by that patient). Rows of different views have different keys, so with several views
    each view gets its own folder out/<view>/.
    Returns {view: number of rows}.
    """
    src, out = Path(src), Path(out)
    case_dirs = sorted(d for d in src.iterdir() if d.is_dir()) if src.is_dir() else []
    if not case_dirs:
        raise DataError(f"{src}: no case folders")
    mods, rows = None, {v: [] for v in views}
    for d in case_dirs:
        files = {f.name[len(d.name) + 1:].split(".nii")[0]: f for f in d.glob(f"{d.name}-*.nii*")}
        if "seg" not in files:
            log(f"{d.name}: no {d.name}-seg.nii.gz (no tumour labels), skipped")
            continue
        present = [m for m in MODALITIES if m in files]
        if not present:
            log(f"{d.name}: none of the modalities {', '.join(MODALITIES)}, skipped")
            continue
        if mods is None:
            mods = present
            log(f"modalities: {', '.join(mods)}")
        if present != mods:
            log(f"{d.name}: modalities {present} differ from the first case's {mods}, skipped")
            continue
        try:
            images, brain, _ = read_study([files[m] for m in mods], files.get("brainmask"))
            seg = read_nifti(files["seg"]) > 0
        except DataError as e:  # one bad case does not stop the others
            log(f"{d.name}: {e}; skipped")
            continue
        if seg.shape != brain.shape:
            log(f"{d.name}: seg of shape {seg.shape}, volumes {brain.shape}; skipped")
            continue
        added = {}
        for view in views:
            vi, axis = VIEWS.index(view), VIEW_AXIS[view]
            folder = out if len(views) == 1 else out / view
            (folder / "images").mkdir(parents=True, exist_ok=True)
            counts = seg.sum(tuple(a for a in range(3) if a != axis))
            tumour = np.nonzero(counts >= max(min_tumor_px, 1))[0]
            free = np.nonzero((counts == 0) & brain_slices(brain, view))[0]
            n_free = min(len(free), round(negatives * len(tumour)))
            spread = np.linspace(0, len(free) - 1, n_free).round().astype(int)
            free = free[spread] if n_free else free[:0]
            for k in sorted([*tumour, *free]):
                row = {}
                for j, (m, img) in enumerate(zip(mods, images)):
                    name = f"images/{d.name}_{vi}-{k:03d}_{j}.{'png' if context else 'jpg'}"
                    (folder / name).write_bytes(slice_image(img, view, k, context))
                    row[f"{m} {view.capitalize()}_path"] = name
                row["box"] = [mask_box(view_slice(seg, view, k))] if counts[k] > 0 else []
                row["case"] = d.name
                if context:
                    row[data.CONTEXT_KEY] = context
                rows[view].append(row)
            added[view] = f"{len(tumour)} slices"
            if negatives > 0:
                added[view] += f" + {n_free} without tumour"
        log(f"{d.name}: " + ", ".join(f"{view} {n}" for view, n in added.items()))
    if mods is None:
        raise DataError(f"{src}: no case has a seg file; nothing to convert")
    for view in views:
        folder = out if len(views) == 1 else out / view
        val = write_split(folder, rows[view], [r["case"] for r in rows[view]], val_fraction, seed)
        n_free = sum(not r["box"] for r in rows[view])
        log(f"{view}: {len(rows[view])} slices ({n_free} without tumour), "
            f"{len(val)} validation cases ({', '.join(sorted(val))}) -> {folder}")
    return {v: len(rows[v]) for v in views}


# -----------------------------------------------------------------------------
# Image + mask pairs: the form most public sets ship in (figshare brain tumours, the LGG collection,
# many Kaggle sets). A pattern with "{}" names each modality's file and the mask's, relative to the
# source folder: `images/{}.jpg` + `masks/{}.png` (figshare), or `{}_flair.png`, `{}_t1c.png` +
# `{}_seg.png`. The "{}" part is the slice's key, shared by its files.

def _natural(key):
    """Sort key that puts 'x2' before 'x10'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _pattern_regex(pattern):
    head, tail = pattern.split("{}", 1)
    return re.compile(re.escape(head) + "(.+)" + re.escape(tail) + "$")


def read_mask(path, size):
    """A mask image -> bool (H, W), mask > 0. Refuses a mask of another size than its image (W, H)
    and one that is not binary (more than one nonzero value: a JPEG-compressed or soft mask)."""
    try:
        with Image.open(path) as im:
            m = np.asarray(im)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the mask ({e})") from None
    if m.ndim == 3:  # an RGB(A) mask is fine when its colour channels agree
        if not (m[..., :3] == m[..., :1]).all():
            raise DataError(f"{path}: a colour mask whose channels differ; "
                            f"expected a grey 0/1 or 0/255 mask")
        m = m[..., 0]
    if (m.shape[1], m.shape[0]) != tuple(size):
        raise DataError(f"{path}: mask is {m.shape[1]}x{m.shape[0]} "
                        f"but its image is {size[0]}x{size[1]}")
    values = np.unique(m)
    if len(values[values != 0]) > 1:
        more = " ..." if len(values) > 6 else ""
        raise DataError(f"{path}: mask is not binary: values {values[:6].tolist()}{more}; "
                        f"expected 0 and one other value")
    return m != 0


def regions(mask, min_px):
    """Connected regions (4-neighbour) of a bool mask with at least min_px pixels -> list of bool
    masks."""
    seen, found = np.zeros_like(mask), []
    H, W = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pixels = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for v, u in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= v < H and 0 <= u < W and mask[v, u] and not seen[v, u]:
                    seen[v, u] = True
                    stack.append((v, u))
        if len(pixels) >= min_px:
            region = np.zeros_like(mask)
            region[tuple(np.array(pixels).T)] = True
            found.append(region)
    return found


def read_cases_csv(path):
    """A csv whose first column is the slice key and second the patient (or run) -> {key: case}."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2 or any(len(r) < 2 for r in rows):
        raise DataError(f"{path}: expected a header and rows of at least two columns: key, patient")
    return {r[0].strip(): r[1].strip() for r in rows[1:]}


def convert_masks(src, out, modalities, mask_pattern, view="Axial", cases_csv=None, min_region_px=0,
                  val_fraction=0.2, seed=0, log=print):
    """Image + mask pairs under src -> out/summary.jsonl, train.jsonl, val.jsonl (split by patient).

    modalities: {name: pattern}, e.g. {"t1c": "images/{}.jpg"}; mask_pattern e.g. "masks/{}.png".
    Rows point at the source images (paths relative to out) and hold the box of `mask > 0`, or with
    min_region_px > 0 one box per connected region of at least that many pixels (a slice whose
    regions are all smaller is left out: it neither has a box nor shows no tumour); "box": [] when
    the mask is empty. The patient of a row is cases_csv's (key -> patient), else read from the file
    names (data.case_id), and is written as the row's "case". Returns the number of rows."""
    src, out = Path(src), Path(out)
    first, pattern = next(iter(modalities.items()))
    rx, mask_rx = _pattern_regex(pattern), _pattern_regex(mask_pattern)
    found = {}
    for f in src.glob(pattern.replace("{}", "*")):
        rel = f.relative_to(src).as_posix()
        m = rx.match(rel)
        if m and not mask_rx.match(rel):  # a mask that the image pattern matches is no image
            found[m.group(1)] = f
    if not found:
        raise DataError(f"{src}: no file matches the {first} pattern {pattern!r}")
    case_of = read_cases_csv(cases_csv) if cases_csv else None
    out.mkdir(parents=True, exist_ok=True)
    rows, cases, n_small = [], [], 0
    for key in sorted(found, key=_natural):
        paths = [src / p.replace("{}", key) for p in modalities.values()]
        mask_path = src / mask_pattern.replace("{}", key)
        for p in paths[1:] + [mask_path]:
            if not p.exists():
                raise DataError(f"{p}: missing (the partner of {found[key]})")
        sizes = set()
        for p in paths:
            try:
                with Image.open(p) as im:
                    sizes.add(im.size)
            except (OSError, ValueError) as e:
                raise DataError(f"{p}: cannot read the image ({e})") from None
        if len(sizes) > 1:
            raise DataError(f"{paths[0]}: its modalities differ in size {sorted(sizes)}")
        mask = read_mask(mask_path, sizes.pop())
        if min_region_px > 0:
            parts = regions(mask, min_region_px)
        else:
            parts = [mask] if mask.any() else []
        if mask.any() and not parts:  # only regions too small to box: neither a box nor "no tumour"
            n_small += 1
            continue
        if case_of is not None:
            if key not in case_of:
                raise DataError(f"{cases_csv}: no row for slice {key!r}")
            case = case_of[key]
        else:
            case = data.case_id(*map(str, paths))
        row = {f"{name} {view}_path": os.path.relpath(p, out) for name, p in zip(modalities, paths)}
        row.update(box=[mask_box(r) for r in parts], case=case)
        rows.append(row)
        cases.append(case)
    if len(set(cases)) < 2:
        log(f"warning: every row has the patient {cases[0]!r}; "
            f"give --cases CSV so that patients can be told apart")
    val = write_split(out, rows, cases, val_fraction, seed)
    n_empty = sum(not r["box"] for r in rows)
    small = (f"; {n_small} slices left out, their mask's regions all under {min_region_px} pixels"
             if n_small else "")
    log(f"{len(rows)} slices ({n_empty} with an empty mask), {len(set(cases))} patients, "
        f"{len(val)} for validation -> {out}{small}")
    return len(rows)


# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    parser = argparse.ArgumentParser(description="Make datasets for minigpt-mri.")
    # one line, not the whole usage
    parser.error = lambda message: sys.exit(f"error: {message} (see --help)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="write a synthetic BraTS-like demo dataset")
    p.add_argument("out_dir", help="output folder (images/, summary.jsonl, contact_sheet.png)")
    p.add_argument("--cases", type=int, default=60,
                   help="number of synthetic patients (default 60)")
    p.add_argument("--slices", type=int, default=6, help="slices per patient (default 6)")
    p.add_argument("--size", type=int, default=128, help="image size in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed; same seed, same files (default 0)")
    p = sub.add_parser("brats", help="convert BraTS NIfTI case folders into JPEG slices and jsonl")
    p.add_argument("src_dir",
                   help="folder of case folders <case>/<case>-{t2f,t2w,t1n,t1c,seg}.nii.gz")
    p.add_argument("out_dir", help="output folder (images/, summary.jsonl, train.jsonl, val.jsonl, "
                                   "contact_sheet.png)")
    p.add_argument("--views", default="axial",
                   help="comma-separated subset of axial,coronal,sagittal (default axial)")
    p.add_argument("--min-tumor-px", type=int, default=100,
                   help="keep slices with at least this many tumour pixels (default 100)")
    p.add_argument("--negatives", type=float, default=0.0, metavar="R",
                   help='also R slices without tumour ("box": []) per tumour slice, spread over '
                        'the slices that show brain (or head), to teach the answer "no tumour" '
                        '(default 0: tumour slices only)')
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="fraction of patients for val.jsonl (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient split (default 0)")
    p.add_argument("--context-slices", type=int, default=0, metavar="C",
                   help="C > 0: each picture is an RGB PNG of slices k - C, k, k + C (red, green, "
                        "blue), so the model sees the tumour's neighbours; whole studies are "
                        "then answered the same way (default 0: a grey JPEG of slice k)")
    p = sub.add_parser("masks",
                       help="convert image + mask pairs (one or several modalities) into jsonl")
    p.add_argument("src_dir", help="the dataset's folder; the patterns below are relative to it")
    p.add_argument("out_dir",
                   help="output folder (summary.jsonl, train.jsonl, val.jsonl, contact_sheet.png)")
    p.add_argument("--modality", action="append", metavar="NAME=PATTERN",
                   help='a modality and its files, "{}" standing for the slice key, e.g. '
                        't1c=images/{}.jpg; repeat for several modalities, in the order the model '
                        'reads them (default t1c=images/{}.jpg)')
    p.add_argument("--mask", default="masks/{}.png",
                   help="the mask files, e.g. {}_seg.png (default masks/{}.png)")
    p.add_argument("--view", default="Axial",
                   help="view named in the row keys, '<modality> <View>_path' (default Axial)")
    p.add_argument("--cases", help="csv of slice key, patient (header first): the patient of each "
                                   "slice; default: read from the file names")
    p.add_argument("--min-region-px", type=int, default=0,
                   help="0: one box around all of mask > 0 (default); N: one box per connected "
                        "region of >= N pixels")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="fraction of patients for val.jsonl (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient split (default 0)")
    for sp in sub.choices.values():
        sp.error = parser.error
    args = parser.parse_args(argv)
    if args.command == "masks":
        mods = {}
        for spec in args.modality or ["t1c=images/{}.jpg"]:
            name, _, pattern = spec.partition("=")
            if not name or pattern.count("{}") != 1:
                parser.error(f"--modality {spec!r}: "
                             f"expected NAME=PATTERN with one {{}} in the pattern")
            mods[name] = pattern
        if args.mask.count("{}") != 1:
            parser.error(f"--mask {args.mask!r}: expected one {{}} in the pattern")
        convert_masks(args.src_dir, args.out_dir, mods, args.mask, args.view, args.cases,
                      args.min_region_px, args.val_fraction, args.seed)
    elif args.command == "demo":
        path = make_demo(args.out_dir, args.cases, args.slices, args.seed, args.size)
        print(f"wrote {path} and {Path(args.out_dir) / 'contact_sheet.png'}")
    else:
        views = [v.strip().lower() for v in args.views.split(",") if v.strip()]
        bad = [v for v in views if v not in VIEWS]
        if bad or not views:
            parser.error(f"--views: unknown view(s) {bad}; choose from {', '.join(VIEWS)}")
        if args.negatives < 0:
            parser.error(f"--negatives {args.negatives}: expected a number >= 0")
        if not 0 <= args.context_slices <= data.MAX_CONTEXT:
            parser.error(f"--context-slices {args.context_slices}: expected 0 to "
                         f"{data.MAX_CONTEXT}")
        convert_brats(args.src_dir, args.out_dir, views, args.min_tumor_px, args.negatives,
                      args.val_fraction, args.seed, args.context_slices)


if __name__ == "__main__":
    try:
        main()
    except DataError as e:  # the user's input: one line, no traceback
        sys.exit(f"error: {e}")

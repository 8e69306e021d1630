"""Tests of prepare.py: the NIfTI-1 reader on files written here, the converter on a
tiny synthetic study and (when ../shared/data is present) on real BraTS cases, the demo dataset."""
import gzip
import re
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import prepare

DT = {np.dtype("int16"): 4, np.dtype("uint8"): 2, np.dtype("float32"): 16, np.dtype("float64"): 64,
      np.dtype("int32"): 8, np.dtype("uint16"): 512}


def write_nifti(path, stored, rot=np.diag([-1.0, -1.0, 1.0]), slope=1.0, inter=0.0, form="sform",
                endian="<", offset=(0.0, 0.0, 0.0)):
    """A minimal single-file NIfTI-1 (gzip): `stored` is the on-disk array (x fastest), `rot` maps
    its voxel axes to RAS world directions (in mm per voxel), `offset` is voxel 0's place in mm."""
    h = bytearray(352)
    e = endian
    struct.pack_into(e + "i", h, 0, 348)
    struct.pack_into(e + "8h", h, 40, stored.ndim, *stored.shape, *[1] * (7 - stored.ndim))
    struct.pack_into(e + "2h", h, 70, DT[stored.dtype], stored.dtype.itemsize * 8)
    struct.pack_into(e + "8f", h, 76, 1, 1, 1, 1, 0, 0, 0, 0)
    struct.pack_into(e + "f", h, 108, 352)
    struct.pack_into(e + "2f", h, 112, slope, inter)
    if form == "sform":
        struct.pack_into(e + "2h", h, 252, 0, 1)
        sform = np.concatenate([rot, np.array(offset, float)[:, None]], 1)  # (3, 4)
        struct.pack_into(e + "12f", h, 280, *sform.ravel())
    else:  # qform: rotation as a quaternion (only the identity and 180 deg about z used here)
        struct.pack_into(e + "2h", h, 252, 1, 0)
        b, c, d = (0, 0, 1) if np.allclose(rot, np.diag([-1, -1, 1])) else (0, 0, 0)
        struct.pack_into(e + "3f", h, 256, b, c, d)
    h[344:348] = b"n+1\0"
    body = stored.astype(stored.dtype.newbyteorder(e)).tobytes(order="F")
    with gzip.open(path, "wb") as f:
        f.write(bytes(h) + body)


def ras_volume(shape=(6, 5, 4)):
    return np.arange(np.prod(shape), dtype=np.int16).reshape(shape)


@pytest.mark.parametrize("form", ["sform", "qform"])
@pytest.mark.parametrize("endian", ["<", ">"])
def test_read_nifti_orients_to_ras(tmp_path, form, endian):
    ras = ras_volume()
    stored = ras[::-1, ::-1, :].copy()  # as BraTS stores it: L, P, S
    write_nifti(tmp_path / "v.nii.gz", stored, form=form, endian=endian)
    got = prepare.read_nifti(tmp_path / "v.nii.gz")
    assert got.dtype == np.float32 and np.array_equal(got, ras)


def test_read_nifti_permuted_axes(tmp_path):
    ras = ras_volume()
    stored = ras.transpose(2, 0, 1)[::-1].copy()  # voxel axes: (inferior, right, anterior)
    rot = np.array([[0, 1, 0], [0, 0, 1], [-1, 0, 0]], float)  # column i: voxel axis i's direction
    write_nifti(tmp_path / "v.nii.gz", stored, rot=rot)
    assert np.array_equal(prepare.read_nifti(tmp_path / "v.nii.gz"), ras)


@pytest.mark.parametrize("dtype", ["int16", "uint8", "float32", "float64", "int32", "uint16"])
def test_read_nifti_dtypes_and_scaling(tmp_path, dtype):
    stored = (ras_volume() % 50).astype(dtype)
    write_nifti(tmp_path / "v.nii.gz", stored, rot=np.eye(3), slope=2.0, inter=-3.0)
    assert np.allclose(prepare.read_nifti(tmp_path / "v.nii.gz"), stored.astype(np.float64) * 2 - 3)


def test_read_nifti_rejects_non_nifti(tmp_path):
    with gzip.open(tmp_path / "x.nii.gz", "wb") as f:
        f.write(b"\0" * 400)
    with pytest.raises(data.DataError, match=r"x\.nii\.gz: not a single-file NIfTI-1"):
        prepare.read_nifti(tmp_path / "x.nii.gz")


def test_read_nifti_refuses_what_it_cannot_read(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "png.nii.gz", format="PNG")  # not gzip
    (tmp_path / "text.nii").write_text("hello")
    write_nifti(tmp_path / "4d.nii.gz", np.zeros((4, 4, 3, 2), np.int16))
    write_nifti(tmp_path / "3d.nii.gz", np.zeros((4, 4, 3), np.int16))
    with gzip.open(tmp_path / "3d.nii.gz") as f:
        raw = f.read()
    with gzip.open(tmp_path / "short.nii.gz", "wb") as f:
        f.write(raw[:-10])
    corrupt = bytearray(gzip.compress(raw))
    corrupt[30:60] = bytes(30)  # the compressed stream damaged, not cut short
    (tmp_path / "corrupt.nii.gz").write_bytes(bytes(corrupt))
    for name, message in [("png.nii.gz", "cannot be read as a NIfTI file"),
                          ("text.nii", "too short"),
                          ("corrupt.nii.gz", "cannot be read as a NIfTI file"),
                          ("4d.nii.gz", "a 4-D image; expected one 3-D volume"),
                          ("short.nii.gz", "truncated"),
                          ("missing.nii.gz", "cannot be read as a NIfTI file")]:
        with pytest.raises(data.DataError, match=re.escape(f"{tmp_path / name}: {message}")):
            prepare.read_nifti(tmp_path / name)


def true_box(mask):
    """Pixel edges [x0, y0, x1, y1] of a 2-D mask's pixels."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_slice_boxes_map_back_to_the_files_voxels_and_millimetres(tmp_path):
    """A tumour stored in a file with permuted, flipped axes and 2 mm voxels: the union of its slice
    boxes, in any view, maps back (volume_box, Grid.to_file) to its box in the file's own voxels,
    and Grid.to_mm to the hand-computed millimetres."""
    stored = np.zeros((7, 11, 9), np.uint8)  # voxel axes: (inferior, right, anterior), as above
    stored[2:5, 3:9, 1:4] = 1
    rot = 2 * np.array([[0, 1, 0], [0, 0, 1], [-1, 0, 0]], float)
    write_nifti(tmp_path / "seg.nii.gz", stored, rot=rot, offset=(10.0, -20.0, 30.0))
    ras, grid = prepare.read_volume(tmp_path / "seg.nii.gz")
    assert ras.shape == (11, 9, 7)
    for view in prepare.VIEWS:
        axis = prepare.VIEW_AXIS[view]
        boxes = []
        for k in range(ras.shape[axis]):
            img = prepare.view_slice(ras, view, k)
            if img.any():
                b = prepare.volume_box(true_box(img), view, k, ras.shape)
                assert prepare.image_box(b, view, ras.shape) == true_box(img)
                boxes.append(b)
        boxes = np.array(boxes)
        union = list(boxes[:, :3].min(0)) + list(boxes[:, 3:].max(0))
        assert grid.to_file(union) == [2, 3, 1, 5, 9, 4], view
    # voxel i of axis 0 (inferior) is at z = 30 - 2 i mm, axis 1 at x = 10 + 2 j, axis 2 at
    # y = -20 + 2 k; edges at i - 0.5
    assert grid.to_mm([2, 3, 1, 5, 9, 4]) == [10 + 2 * 2.5, -20 + 2 * 0.5, 30 - 2 * 4.5,
                                              10 + 2 * 8.5, -20 + 2 * 3.5, 30 - 2 * 1.5]


def test_to_mm_rounds_to_a_tenth_of_a_millimetre():
    """Voxels of 0.9375 x 0.9375 x 1.2 mm: the millimetres of their edges rounded to 0.1 mm."""
    grid = prepare.Grid((4, 4, 4), (0, 1, 2), (False,) * 3, np.diag([0.9375, 0.9375, 1.2, 1.0]))
    mm = grid.to_mm([1, 2, 3, 3, 4, 4])  # edges at 0.46875, 1.40625, 3.0, 2.34375, 3.28125, 4.2 mm
    assert mm == [0.5, 1.4, 3.0, 2.3, 3.3, 4.2] and all(type(v) is float for v in mm)


def test_read_study_errors_name_the_file(tmp_path):
    a = np.ones((6, 5, 4), np.float32)
    write_nifti(tmp_path / "a.nii.gz", a)
    write_nifti(tmp_path / "b.nii.gz", np.ones((6, 5, 3), np.float32))
    z = np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32)
    write_nifti(tmp_path / "z.nii.gz", z)
    message = "one shape, got a.nii.gz (6, 5, 4), b.nii.gz (6, 5, 3)"
    with pytest.raises(data.DataError, match=re.escape(message)):
        prepare.read_study([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"])
    message = f"{tmp_path / 'z.nii.gz'}: its intensities do not split into air and head"
    with pytest.raises(data.DataError, match=re.escape(message)):
        prepare.read_study([tmp_path / "z.nii.gz"])  # noise: no zero background, no head in it
    mask = np.zeros((6, 5, 4), np.uint8)
    mask[1:5, 1:4, 1:3] = 1
    write_nifti(tmp_path / "mask.nii.gz", mask)
    images, brain, _ = prepare.read_study([tmp_path / "z.nii.gz"], tmp_path / "mask.nii.gz")
    assert brain.sum() == 24 and (images[0][~brain] == 0).all()
    assert prepare.brain_slices(brain, "axial").tolist() == [False, True, True, False]


def make_case(root, name, mods=("t2f", "t1c"), seg=True, shape=(24, 20, 6)):
    """A small study in RAS: brain = a box of noise; the tumour front-right, bright everywhere."""
    d = root / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(len(name))
    brain = np.zeros(shape, bool)
    brain[2:-2, 2:-2, :] = True
    tumour = np.zeros(shape, bool)
    tumour[18:22, 12:16, 1:5] = True  # x 18..21 is the patient's right, y 12..15 is anterior half
    for m in mods:
        v = np.where(brain, rng.normal(100, 5, shape), 0) + 200 * tumour
        write_nifti(d / f"{name}-{m}.nii.gz", v.astype(np.float32)[::-1, ::-1].copy())
    if seg:
        write_nifti(d / f"{name}-seg.nii.gz", (2 * tumour).astype(np.uint8)[::-1, ::-1].copy())


def test_convert_brats_synthetic(tmp_path, monkeypatch):
    """Rows name their patient as "case" and the split is by it: the converter never reads the
    patient back from file names (data.case_id, the fallback for users' own files, fails here)."""
    fail = lambda *paths: pytest.fail(f"patient read from the names {paths}")
    monkeypatch.setattr(data, "case_id", fail)
    src = tmp_path / "src"
    for k in range(4):
        make_case(src, f"BraTS-TEST-0000{k}-000")
    make_case(src, "BraTS-TEST-00009-000", seg=False)
    messages = []
    counts = prepare.convert_brats(src, tmp_path / "out", ("axial", "sagittal"), min_tumor_px=10,
                                   val_fraction=0.25, log=messages.append)
    assert counts == {"axial": 4 * 4, "sagittal": 4 * 4}
    no_seg = "BraTS-TEST-00009-000: no BraTS-TEST-00009-000-seg.nii.gz"
    assert any(no_seg in m and "skipped" in m for m in messages)
    mods, samples = data.read_summary(tmp_path / "out" / "axial" / "summary.jsonl")
    assert mods == ["t2f Axial", "t1c Axial"]
    s = samples[0]
    assert s.paths[0].endswith("images/BraTS-TEST-00000-000_0-001_0.jpg")
    assert s.case == "BraTS-TEST-00000-000"
    # axial image (Y=20 rows, X=24 cols), radiological: anterior at the top, patient's right left
    assert s.size == (24, 20) and s.boxes == [[24 - 22, 20 - 16, 24 - 18, 20 - 12]]
    img = np.asarray(Image.open(s.paths[1]))
    assert img[5:7, 3:5].mean() > 200 and img[12:18, 10:20].mean() < 200  # bright tumour in the box
    assert img[0].max() < 20  # outside the brain is black
    sagittal = tmp_path / "out" / "sagittal" / "summary.jsonl"
    _, sag = data.read_summary(sagittal, check_images=False)  # 6 px high: listed, not read
    assert sag[0].size == (20, 6)
    assert sag[0].boxes == [[20 - 16, 6 - 5, 20 - 12, 6 - 1]]  # facing left, top up
    train = (tmp_path / "out" / "axial" / "train.jsonl").read_text().splitlines()
    val = (tmp_path / "out" / "axial" / "val.jsonl").read_text().splitlines()
    case = lambda line: json.loads(line)["case"]
    assert len(train) == 12 and len(val) == 4
    assert not {case(r) for r in train} & {case(r) for r in val}
    assert {case(r) for r in train + val} == {f"BraTS-TEST-0000{k}-000" for k in range(4)}
    assert all(s.case == s.row["case"] == Path(s.paths[0]).name.split("_")[0] for s in samples)


def test_convert_brats_negatives(tmp_path):
    """--negatives 1: as many tumour-free slices as tumour slices where there are enough (here 2 of
    z 0 and 5, the tumour being on 1..4), "box": [], their pixels written like the others."""
    src = tmp_path / "src"
    for k in range(2):
        make_case(src, f"BraTS-TEST-0000{k}-000")
    counts = prepare.convert_brats(src, tmp_path / "out", min_tumor_px=10, negatives=1.0,
                                   val_fraction=0.5, log=print)
    assert counts == {"axial": 2 * 6}
    _, samples = data.read_summary(tmp_path / "out" / "summary.jsonl")
    empty = [s for s in samples if not s.boxes]
    assert [Path(s.paths[0]).name for s in empty][:2] == ["BraTS-TEST-00000-000_0-000_0.jpg",
                                                          "BraTS-TEST-00000-000_0-005_0.jpg"]
    img = np.asarray(Image.open(empty[0].paths[0]))
    assert len(empty) == 4
    assert (img[4:16, 4:20] > 0).mean() > 0.9 and img[0].max() < 20  # brain, black around it
    # 1 per case: the first
    prepare.convert_brats(src, tmp_path / "half", min_tumor_px=10, negatives=0.25, log=print)
    _, samples = data.read_summary(tmp_path / "half" / "summary.jsonl")
    names = [Path(s.paths[0]).name for s in samples if not s.boxes]
    assert names == [f"BraTS-TEST-0000{k}-000_0-000_0.jpg" for k in range(2)]


def test_convert_brats_context_slices(tmp_path):
    """--context-slices 1: each picture is an RGB PNG whose red, green and blue are the windowed
    slices k - 1, k and k + 1 exactly (the end slice repeated past the volume: slice 0's red is
    slice 0), and each row says "context_slices": 1."""
    src = tmp_path / "src"
    make_case(src, "BraTS-TEST-00000-000")
    prepare.convert_brats(src, tmp_path / "out", min_tumor_px=10, negatives=1.0, val_fraction=0,
                          context=1, log=print)
    _, samples = data.read_summary(tmp_path / "out" / "summary.jsonl")
    assert data.context_slices(samples, "summary.jsonl") == 1
    case = src / "BraTS-TEST-00000-000"
    volumes, _, _ = prepare.read_study([case / f"{case.name}-{m}.nii.gz" for m in ("t2f", "t1c")])
    ks = []
    for s in samples:
        k = int(Path(s.paths[0]).stem.split("-")[-1].split("_")[0])
        ks.append(k)
        for path, vol in zip(s.paths, volumes):
            assert path.endswith(".png") and Image.open(path).mode == "RGB"
            got = np.asarray(Image.open(path))  # (H, W, 3)
            for c, d in enumerate((-1, 0, 1)):
                want = prepare.view_slice(vol, "axial", min(max(k + d, 0), 5))
                assert np.array_equal(got[..., c], want), (path, c)
    assert 0 in ks and 5 in ks  # both ends: the tumour-free slices 0 and 5
    # without the flag: grey JPEGs and no key, as before
    prepare.convert_brats(src, tmp_path / "plain", min_tumor_px=10, val_fraction=0, log=print)
    _, plain = data.read_summary(tmp_path / "plain" / "summary.jsonl")
    assert data.context_slices(plain, "x") == 0 and data.CONTEXT_KEY not in plain[0].row
    assert Image.open(plain[0].paths[0]).mode == "L"


@pytest.mark.parametrize("value", ["-1", "17"])
def test_context_slices_out_of_range_is_one_line(tmp_path, value):
    with pytest.raises(SystemExit) as e:
        prepare.main(["brats", str(tmp_path), str(tmp_path / "out"), "--context-slices", value])
    assert e.value.code == f"error: --context-slices {value}: expected 0 to 16 (see --help)"
    assert not (tmp_path / "out").exists()  # refused before any work


def test_convert_brats_real(shared_data, tmp_path):
    """One real case from each folder, plus the case without labels (linked, not copied)."""
    src = tmp_path / "src"
    src.mkdir()
    for rel in ("brats2015-expert/BraTS2015-pat0001_1", "brats-format/BraTS-GLI-00001-000"):
        (src / rel.split("/")[1]).symlink_to(shared_data / rel)
    messages = []
    counts = prepare.convert_brats(src, tmp_path / "out", ("axial",), min_tumor_px=100,
                                   log=messages.append)
    assert any("BraTS-GLI-00001-000: no" in m for m in messages)
    assert counts["axial"] > 30
    mods, samples = data.read_summary(tmp_path / "out" / "summary.jsonl")
    assert mods == ["t2f Axial", "t1c Axial"] and {s.size for s in samples} == {(240, 240)}
    for s in samples:  # whole-tumour boxes are inside the brain and the tumour is bright on FLAIR
        (x0, y0, x1, y1), = s.boxes
        flair = np.asarray(Image.open(s.paths[0]), np.float32)
        assert flair[int(y0):int(y1), int(x0):int(x1)].mean() > flair[flair > 0].mean()
    # anatomically upright: the middle slice's top row (the front) is narrower than its widest
    mid = np.asarray(Image.open(samples[len(samples) // 2].paths[0])) > 0
    rows = np.nonzero(mid.any(1))[0]
    assert mid[rows[0] + 5].sum() < mid.sum(1).max()


# -- the NIfTI writer ------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["sform", "qform"])
@pytest.mark.parametrize("endian", ["<", ">"])
def test_write_nifti_keeps_the_studys_grid(tmp_path, form, endian):
    """A volume written on a study's grid (axes permuted and flipped, 2 mm, an offset) reads back
    as the same RAS array with the same affine, and the file keeps the study's sform and qform
    fields byte for byte (what a viewer places the volume by)."""
    stored = np.arange(7 * 11 * 9, dtype=np.int16).reshape(7, 11, 9)
    rot = np.array([[0, 1, 0], [0, 0, 1], [-1, 0, 0]], float)
    rot, stored = (2 * rot, stored) if form == "sform" else (np.diag([-1.0, -1.0, 1.0]), stored)
    write_nifti(tmp_path / "study.nii.gz", stored, rot=rot, form=form, endian=endian,
                offset=(10.0, -20.0, 30.0))
    ras, grid = prepare.read_volume(tmp_path / "study.nii.gz")
    labels = (ras % 3).astype(np.uint8)
    prepare.write_nifti(tmp_path / "labels.nii.gz", labels, grid, "boxes")
    prepare.write_nifti(tmp_path / "plain.nii", ras.astype(np.float32), grid)
    back, back_grid = prepare.read_volume(tmp_path / "labels.nii.gz")
    assert np.array_equal(back, labels) and np.array_equal(back_grid.affine, grid.affine)
    assert back_grid.axes == grid.axes and back_grid.flipped == grid.flipped
    assert np.array_equal(prepare.read_nifti(tmp_path / "plain.nii"), ras)
    with gzip.open(tmp_path / "study.nii.gz") as f:
        study = f.read(348)
    with gzip.open(tmp_path / "labels.nii.gz") as f:
        written = f.read(352)
    assert written[76:108] == study[76:108]  # pixdim (qfac, voxel sizes)
    assert written[252:344] == study[252:344]  # qform and sform codes, quaternion, offsets, srows
    e = endian
    assert struct.unpack(e + "2h", written[70:74]) == (2, 8)  # uint8
    assert written[148:153] == b"boxes" and written[344:348] == b"n+1\0"


# -- studies without a brain mask: the head found in the study ------------------------------------

def ellipsoid(shape, centre, radii):
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) < 1


def dilate(mask, r):
    """mask grown by r voxels, one 6-neighbour step at a time."""
    for _ in range(r):
        grown = mask.copy()
        for a in range(3):
            lo = (slice(None),) * a + (slice(None, -1),)
            hi = (slice(None),) * a + (slice(1, None),)
            grown[lo] |= mask[hi]
            grown[hi] |= mask[lo]
        mask = grown
    return mask


def scanner_background(vols, brain, seed=0, sigma=0.04, gap=3, skull=6, skull_level=0.8):
    """A skull-stripped study (RAS volumes, 0 outside the brain) as a scanner gives it: a shell
    `skull` voxels thick, `gap` voxels out from the brain, at skull_level times the brain's 99th
    percentile (the skull and scalp), and Rician noise everywhere outside the brain (the magnitude
    of complex Gaussian noise of sigma `sigma` times that percentile). The brain is kept."""
    rng = np.random.default_rng(seed)
    inner = dilate(brain, gap)
    shell = dilate(inner, skull) & ~inner
    noisy = []
    for v in vols:
        p99 = np.percentile(v[brain], 99)
        noise = sigma * p99 * rng.standard_normal((2,) + v.shape, dtype=np.float32)
        outside = np.hypot(np.where(shell, skull_level * p99, 0) + noise[0], noise[1])
        noisy.append(np.where(brain, v, outside).astype(np.float32))
    return noisy


def write_scanner_case(src, dst, seed=0, **kw):
    """The case folder src (<case>-<modality>.nii.gz, seg; background 0) -> the same study with a
    scanner's background (scanner_background) in dst, named after dst, written on src's grids (no
    brain mask). The seg is copied."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    read = {m: prepare.read_volume(p) for m in prepare.MODALITIES
            if (p := prepare.case_file(src, m))}
    brain = np.any([v != 0 for v, _ in read.values()], 0)
    noisy = scanner_background([v for v, _ in read.values()], brain, seed, **kw)
    for (m, (_, grid)), v in zip(read.items(), noisy):
        prepare.write_nifti(dst / f"{dst.name}-{m}.nii.gz", v, grid)
    (dst / f"{dst.name}-seg.nii.gz").write_bytes(prepare.case_file(src, "seg").read_bytes())


def make_head_case(root, name, shape=(40, 36, 28), seed=0):
    """A small study in RAS, background 0: brain = an ellipsoid on slices 8..20 (z) with a dark
    ventricle in it, a bright tumour on slices 12..15; slices 0..7 and 21..27 show no brain."""
    d = root / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    brain = ellipsoid(shape, (20, 18, 14), (12, 10, 7))
    ventricle = ellipsoid(shape, (20, 17, 14), (3, 4, 2))
    tumour = brain & ellipsoid(shape, (14, 22, 13.5), (4, 4, 2.2))
    for k, m in enumerate(("t2f", "t1c")):
        v = np.where(brain, rng.normal(100 + 10 * k, 10, shape), 0) + 150 * tumour
        v = np.where(ventricle, 5, v)
        write_nifti(d / f"{name}-{m}.nii.gz", v.astype(np.float32)[::-1, ::-1].copy())
    write_nifti(d / f"{name}-seg.nii.gz", tumour.astype(np.uint8)[::-1, ::-1].copy())
    return brain


def test_head_region_covers_the_head_and_not_the_air():
    """A head (brain with a dark ventricle, a gap, a bright skull) in Rician noise: the region is
    the whole head, ventricle and gap filled (no holes), and none of the air more than one voxel
    away from it; ~0.1 s at this size."""
    shape = (40, 36, 28)
    brain = ellipsoid(shape, (20, 18, 14), (12, 10, 7))
    ventricle = ellipsoid(shape, (20, 17, 14), (3, 4, 2))
    rng = np.random.default_rng(1)
    vols = [np.where(ventricle, 5, np.where(brain, rng.normal(100, 10, shape), 0)),
            np.where(ventricle, 5, np.where(brain, rng.normal(60, 5, shape), 0))]
    vols = scanner_background(vols, brain, gap=2, skull=3)
    head = dilate(brain, 5)
    region = prepare.head_region(vols, "study")
    assert region[head].all()  # brain, ventricle, gap and skull
    assert not region[~dilate(head, 1)].any()  # the air
    assert 0.2 < region.mean() < 0.5


def test_head_region_refuses_noise_and_a_constant(tmp_path):
    """Without a head in it, a study is refused with one line naming its file and saying why."""
    rng = np.random.default_rng(0)
    shape = (40, 36, 28)
    rician = np.hypot(*rng.normal(10, 3, (2,) + shape))
    split = "its intensities do not split into air and head"
    for name, v, why in [("gauss", rng.normal(0, 1, shape), split), ("rician", rician, split),
                         ("constant", np.full(shape, 7.0), "every voxel holds one value")]:
        write_nifti(tmp_path / f"{name}.nii.gz", v.astype(np.float32))
        with pytest.raises(data.DataError, match=re.escape(f"{tmp_path / name}.nii.gz: ") + why):
            prepare.read_study([tmp_path / f"{name}.nii.gz"])


@pytest.mark.parametrize("background", ["zero", "scanner"])
def test_negatives_come_from_slices_that_show_the_head(tmp_path, background):
    """--negatives takes its tumour-free slices only from slices that show the brain (background
    0) or the head (a scanner's background): never from the slices of air above and below it."""
    clean = tmp_path / "clean"
    brain = make_head_case(clean, "BraTS-HEAD-00000-000")
    src = clean
    reach = 0  # how far the head reaches beyond the brain
    if background == "scanner":
        src, reach = tmp_path / "scanner", 3
        write_scanner_case(clean / "BraTS-HEAD-00000-000", src / "BraTS-HEAD-00000-000", gap=1,
                           skull=2)
    prepare.convert_brats(src, tmp_path / "out", min_tumor_px=1, negatives=10, val_fraction=0,
                          log=lambda *a: None)
    _, samples = data.read_summary(tmp_path / "out" / "summary.jsonl", require_boxes=False)
    slice_of = lambda s: int(Path(s.paths[0]).name.split("-")[-1][:3])
    tumour = [slice_of(s) for s in samples if s.boxes]
    free = [slice_of(s) for s in samples if not s.boxes]
    assert tumour == [12, 13, 14, 15]
    shows = np.nonzero(dilate(brain, reach).any((0, 1)))[0]  # 8..20, with the skull 5..23
    assert set(free) <= set(shows), f"tumour-free slices {free} outside the head {shows}"
    assert {9, 10, 11, 16, 17, 18, 19} <= set(free)


@pytest.mark.parametrize("background", ["zero", "scanner"])
def test_window_sits_inside_the_brain_or_head(tmp_path, background):
    """Intensities are windowed by percentiles inside the brain (or the head), not over the whole
    volume, whose air is most of it: 0.5% of the region is black, 0.5% white, and the brain spans
    the grey range."""
    case = tmp_path / "clean" / "BraTS-HEAD-00000-000"
    brain = make_head_case(tmp_path / "clean", case.name)
    if background == "scanner":  # the skull against the brain, as bright as brain: no dark gap
        write_scanner_case(case, tmp_path / "scanner" / case.name, gap=0, skull=2)
        case = tmp_path / "scanner" / case.name
    images, region, _ = prepare.read_study([case / f"{case.name}-t2f.nii.gz"])
    assert region[brain].all() and region.mean() < 0.4
    t2f = images[0][region]
    assert 0.002 < (t2f == 0).mean() < 0.03 and 0.002 < (t2f == 255).mean() < 0.03
    grey = images[0][brain & ~dilate(~brain, 1)]  # inside the brain, off its edge
    assert np.percentile(grey, 1) < 40 and np.percentile(grey, 99) > 230


def test_brain_mask_wins_over_the_head(tmp_path):
    """A study with a scanner's background and its brain mask is windowed inside the mask."""
    case = tmp_path / "clean" / "BraTS-HEAD-00000-000"
    brain = make_head_case(tmp_path / "clean", case.name)
    noisy = tmp_path / "scanner" / case.name
    write_scanner_case(case, noisy, gap=1, skull=2)
    write_nifti(tmp_path / "mask.nii.gz", brain.astype(np.uint8)[::-1, ::-1].copy())
    images, region, _ = prepare.read_study([noisy / f"{case.name}-t2f.nii.gz"],
                                           tmp_path / "mask.nii.gz")
    assert np.array_equal(region, brain) and not images[0][~brain].any()


def test_scanner_study_converts_like_the_clean_one(tmp_path):
    """The converter on a study with a scanner's background (skull and noise, no brain mask)
    keeps the clean study's tumour slices and boxes, and its pictures of the brain stay close to
    the clean ones: 3-4 grey levels apart on average (measured), as the window's ends move a
    little (the head holds the skull and the noise under it)."""
    brain = make_head_case(tmp_path / "clean", "BraTS-HEAD-00000-000")
    write_scanner_case(tmp_path / "clean" / "BraTS-HEAD-00000-000",
                       tmp_path / "scanner" / "BraTS-HEAD-00000-000", gap=1, skull=2)
    rows = {}
    for kind in ("clean", "scanner"):
        prepare.convert_brats(tmp_path / kind, tmp_path / f"out_{kind}", min_tumor_px=1,
                              negatives=1, val_fraction=0, log=lambda *a: None)
        _, rows[kind] = data.read_summary(tmp_path / f"out_{kind}" / "summary.jsonl",
                                          require_boxes=False)
    tumour = {k: [(Path(s.paths[0]).name, s.boxes) for s in v if s.boxes] for k, v in rows.items()}
    assert tumour["clean"] == tumour["scanner"] and len(tumour["clean"]) == 4
    assert sum(not s.boxes for s in rows["scanner"]) == 4
    for a, b in zip(*[[s for s in v if s.boxes] for v in rows.values()]):
        k = int(Path(a.paths[0]).name.split("-")[-1][:3])
        for pa, pb in zip(a.paths, b.paths):
            clean, noisy = (np.asarray(Image.open(p), np.float32) for p in (pa, pb))
            assert np.abs(clean - noisy)[prepare.view_slice(brain, "axial", k)].mean() < 6


# -- demo dataset ----------------------------------------------------------------------------------

def test_demo_is_deterministic_and_readable(tmp_path):
    a = prepare.make_demo(tmp_path / "a", cases=3, slices_per_case=3, seed=7, size=64)
    b = prepare.make_demo(tmp_path / "b", cases=3, slices_per_case=3, seed=7, size=64)
    c = prepare.make_demo(tmp_path / "c", cases=3, slices_per_case=3, seed=8, size=64)
    assert a.read_text() == b.read_text() and a.read_text() != c.read_text()
    name = "images/DEMO-00001-000_2_3.jpg"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "contact_sheet.png").is_file()
    mods, samples = data.read_summary(a)
    assert mods == ["t2f Axial", "t2w Axial", "t1n Axial", "t1c Axial"] and len(samples) == 9
    assert [s.case for s in samples[:3]] == ["DEMO-00000-000"] * 3
    assert all(s.row["case"] == s.case for s in samples)  # written by the converter, not parsed
    widths = [s.boxes[0][2] - s.boxes[0][0] for s in samples[:3]]
    assert len(set(widths)) > 1  # the tumour changes size across slices


def test_demo_contrasts_follow_the_modalities():
    """Oedema bright on FLAIR and T2, rim bright on T1c, necrosis dark on T1n, CSF bright on T2 and
    dark on FLAIR."""
    rng = np.random.default_rng(0)
    lab = np.full((64, 64), prepare.WM)
    lab[56:] = prepare.BACKGROUND
    lab[:8], lab[8:16], lab[16:24] = prepare.BACKGROUND, prepare.CSF, prepare.OEDEMA
    lab[24:32], lab[32:40] = prepare.RIM, prepare.NECROSIS
    images = prepare._render(rng, lab, 64, np.ones(prepare._SIGNAL.shape))
    t2f, t2w, t1n, t1c = [im.astype(float) for im in images]
    mean = lambda im, r: im[r * 8 + 2: r * 8 + 6, 10:50].mean()
    wm = lambda im: im[44:52, 10:50].mean()
    assert mean(t2f, 2) > wm(t2f) + 40 and mean(t2w, 2) > wm(t2w) + 40  # oedema
    assert mean(t1c, 3) > wm(t1c) + 30 and mean(t1n, 3) < wm(t1n) - 30  # enhancing: after contrast
    assert mean(t1n, 4) < wm(t1n) - 60  # necrosis
    assert mean(t2w, 1) > wm(t2w) + 60 and mean(t2f, 1) < wm(t2f) - 40  # CSF
    assert t2f[:4].max() == 0 and t1c[60:].max() == 0  # skull-stripped background


# -- image + mask pairs ----------------------------------------------------------------------------

def _pair(folder, key, mask, modalities=("flair", "t1c"), size=None):
    """Grey images `<key>_<mod>.png` and a mask `<key>_seg.png` (uint8 array, 0 and 255)."""
    H, W = mask.shape if size is None else size
    for j, m in enumerate(modalities):
        Image.fromarray(np.full((H, W), 40 * (j + 1), np.uint8)).save(folder / f"{key}_{m}.png")
    Image.fromarray(mask).save(folder / f"{key}_seg.png")


def test_masks_boxes_regions_cases_and_split(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    two = np.zeros((40, 50), np.uint8)
    two[5:10, 3:9] = 255          # a 6 x 5 region
    two[20:31, 30:45] = 255       # a 15 x 11 region
    _pair(src, "p1_2", two)
    _pair(src, "p1_10", np.zeros((40, 50), np.uint8))  # no tumour
    one = np.zeros((40, 50), np.uint8)
    one[0:2, 0:2] = 1  # a 0/1 mask reads the same as 0/255
    _pair(src, "p2_1", one)
    mods = {"t2f": "{}_flair.png", "t1c": "{}_t1c.png"}
    n = prepare.convert_masks(src, tmp_path / "out", mods, "{}_seg.png", val_fraction=0.5,
                              log=lambda *a: None)
    assert n == 3
    summary = (tmp_path / "out" / "summary.jsonl").read_text()
    rows = [json.loads(line) for line in summary.splitlines()]
    assert [r["t2f Axial_path"] for r in rows] == [
        "../src/p1_2_flair.png", "../src/p1_10_flair.png", "../src/p2_1_flair.png"]
    assert rows[0]["box"] == [[45, 31, 3, 5]]  # one box around all of mask > 0, [maxx, maxy, ...]
    assert rows[1]["box"] == [] and rows[2]["box"] == [[2, 2, 0, 0]]
    assert [r["case"] for r in rows] == ["p1", "p1", "p2"]  # from the file names
    val = (tmp_path / "out" / "val.jsonl").read_text().splitlines()
    train = (tmp_path / "out" / "train.jsonl").read_text().splitlines()
    assert len(val) + len(train) == 3
    assert {json.loads(v)["case"] for v in val}.isdisjoint(json.loads(t)["case"] for t in train)
    mods_read, samples = data.read_summary(tmp_path / "out" / "summary.jsonl", require_boxes=False)
    assert mods_read == ["t2f Axial", "t1c Axial"] and samples[0].size == (50, 40)

    # one box per connected region of at least 30 pixels; the csv names the patients
    (src / "cases.csv").write_text("key,patient\np1_2,A\np1_10,B\np2_1,B\n")
    messages = []
    prepare.convert_masks(src, tmp_path / "out2", mods, "{}_seg.png", cases_csv=src / "cases.csv",
                          min_region_px=30, log=messages.append)
    summary = (tmp_path / "out2" / "summary.jsonl").read_text()
    rows = [json.loads(line) for line in summary.splitlines()]
    assert rows[0]["box"] == [[9, 10, 3, 5], [45, 31, 30, 20]] and rows[1]["box"] == []
    assert len(rows) == 2  # p2_1's 4-pixel region is too small: left out, no box nor "no tumour"
    assert "1 slices left out, their mask's regions all under 30 pixels" in messages[-1]
    assert [r["case"] for r in rows] == ["A", "B"]


def test_masks_bad_input_names_the_file(tmp_path):
    mods = {"t2f": "{}_flair.png", "t1c": "{}_t1c.png"}
    mask = np.zeros((20, 20), np.uint8)
    mask[2:5, 2:5] = 255
    soft = (mask // 2 + np.eye(20, dtype=np.uint8)).astype(np.uint8)  # values 0, 1, 127, 128
    cases = [
        ("size", lambda d: _pair(d, "a", mask, size=(20, 24)),
         "a_seg.png: mask is 20x20 but its image is 24x20"),
        ("partner", lambda d: (_pair(d, "a", mask), (d / "a_t1c.png").unlink()),
         "a_t1c.png: missing"),
        ("binary", lambda d: _pair(d, "a", soft), "a_seg.png: mask is not binary"),
        ("unreadable", lambda d: (_pair(d, "a", mask), (d / "a_seg.png").write_bytes(b"not a png")),
         "a_seg.png: cannot read the mask"),
        ("nothing", lambda d: None, "no file matches the t2f pattern"),
    ]
    for name, make, message in cases:
        d = tmp_path / name
        d.mkdir()
        make(d)
        with pytest.raises(data.DataError, match=re.escape(message)):
            prepare.convert_masks(d, tmp_path / f"out_{name}", mods, "{}_seg.png",
                                  log=lambda *a: None)

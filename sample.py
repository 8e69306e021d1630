"""
Ask a trained minigpt-mri model where the tumour is.

    python sample.py --images t2f.jpg t2w.jpg t1n.jpg t1c.jpg [--ckpt out] [--draw answer.png]
    python sample.py --data val.jsonl --out pred.jsonl [--ckpt out]
    python sample.py --volume CASE_DIR [--draw study.png]   # a whole NIfTI study
    python sample.py --volume t2f.nii.gz t1n.nii.gz          # or one volume per modality
    python sample.py --volume CASE_DIR --save-nifti boxes.nii.gz   # the boxes, for a viewer
    python sample.py                      # the first validation rows the checkpoint was scored on

One image per modality, in the checkpoint's order. The answer is one JSON line: the box in the
training data's corner order (by default [maxx, maxy, minx, miny]; --box-format xywh gives COCO
[x, y, w, h]), in pixels of the image size it names, or "box": [] for "no tumour".

A whole study (--volume) is read and windowed as prepare.py's converter does it, and every slice of
the trained view that shows brain (or head, for a scan with its skull: prepare.head_region) is
answered: one JSON line per slice with a tumour, then a summary line with the tumour's 3-D box in
the file's voxels and in millimetres (see study_box); --save-nifti writes the boxes as a label
volume on the study's grid, for a viewer.
"""

import argparse
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import prepare
from config import CheckpointError, DataError
from model import PRESENT_AT, MiniGPT, load_checkpoint


@torch.no_grad()
def predict(model, items, load, device, batch_size=32, pad=False):
    """Answer every item in batches of batch_size: load(item) -> its images (N, 3, S, S). -> boxes
    (M, 4) normalised [x0, y0, x1, y1] and p (M,), the probability of a tumour (the answer is "no
    tumour" where p < PRESENT_AT). pad=True fills the last batch up (repeating its last item) so
    that a compiled decode step sees one batch shape only."""
    boxes, probs = [], []
    dtype = next(model.parameters()).dtype  # inputs in the weights' dtype (bf16 with --bf16)
    for i in range(0, len(items), batch_size):
        chunk = items[i: i + batch_size]
        x = torch.stack([load(item) for item in chunk])
        if pad and len(items) > batch_size and len(chunk) < batch_size:
            x = torch.cat([x, x[-1:].expand(batch_size - len(chunk), *x.shape[1:])])
        b, p = model.answer_boxes(x.to(device, dtype))
        boxes.append(b.float().cpu()[: len(chunk)])
        probs.append(p.float().cpu()[: len(chunk)])
    return torch.cat(boxes), torch.cat(probs)


@dataclass
class Run:
    """A trained run as model.load_checkpoint reads it: its checkpoint folder, the model, and the
    data settings an answer needs (meta: modalities, image_size, mean, std, box_format)."""
    folder: Path
    model: MiniGPT
    meta: dict

    @property
    def val_rows(self) -> Path:  # the validation rows train.py scored, saved beside the weights
        return self.folder / "val.jsonl"


# -----------------------------------------------------------------------------
# Slices: images given on the command line, or the rows of a summary.jsonl

def answer_samples(run, samples, device, pad, box_format, with_paths):
    """Answer slices (data.Sample) -> (JSON rows, pixel answers: [x0, y0, x1, y1] or None for "no
    tumour"). A row: the input's image keys (with_paths), the box in box_format or [] for "no
    tumour", p_tumour and the size (W, H) the box refers to."""
    meta = run.meta
    windows = []  # each sample's window [x0, y0, w, h], as read (data.load_images)

    def read(s):
        x, window = data.load_images(s, meta["image_size"], meta["mean"], meta["std"],
                                     meta.get("crop", "none"))  # runs from before --crop: none
        windows.append(window)
        return x

    boxes, probs = predict(run.model, samples, read, device, pad=pad)
    preds = [data.to_pixels(b, w) if p >= PRESENT_AT else None
             for b, p, w in zip(boxes, probs, windows)]
    looked = [i for i, b in enumerate(preds) if b is not None]
    if meta.get("second_look") and looked:  # each box answered again, zoomed around it
        zoom = {}  # sample index -> the window its second look read

        def read_zoomed(i):
            x, zoom[i] = data.load_zoomed(samples[i], preds[i], meta["image_size"], meta["mean"],
                                          meta["std"])
            return x

        boxes, _ = predict(run.model, looked, read_zoomed, device, pad=pad)  # p: the first look's
        for i, b in zip(looked, boxes):
            preds[i] = data.to_pixels(b, zoom[i])
    rows = []
    for s, pred, p in zip(samples, preds, probs):
        row = {k: v for k, v in s.row.items() if k.endswith("_path")} if with_paths else {}
        row["box"] = [data.box_to_output(pred, box_format)] if pred is not None else []
        row["p_tumour"] = round(float(p), 4)
        row["size"] = list(s.size)
        rows.append(row)
    return rows, preds


def images_samples(run, images):
    """--images: one image per modality, in the checkpoint's order -> [Sample]."""
    modalities = run.meta["modalities"]
    if len(images) != len(modalities):
        raise DataError(f"got {len(images)} images, but the checkpoint {run.folder} expects "
                        f"{len(modalities)}, one per modality in this order: "
                        f"{', '.join(modalities)}")
    sample = data.sample_from_images(images)  # each file read, or an error naming it
    context = run.meta.get(data.CONTEXT_KEY, 0)
    for path in sample.paths if context else ():  # such a model reads only three-slice pictures
        with Image.open(path) as im:  # sample_from_images has read it: it opens
            mode = im.mode
        if mode != "RGB":
            raise DataError(f"{path}: a grey image, but the checkpoint {run.folder} reads RGB "
                            f"pictures of slices k - {context}, k, k + {context} (prepare.py brats "
                            f"--context-slices {context}); answer the whole study with --volume")
    return [sample]


def rows_samples(run, path, box_format):
    """--data: every row of a summary.jsonl, its images put in the checkpoint's modality order."""
    modalities = run.meta["modalities"]
    file_mods, samples = data.read_summary(path, box_format=box_format, require_boxes=False)
    if sorted(file_mods) != sorted(modalities):
        raise DataError(f"{path}: modalities {file_mods} differ from the checkpoint's {modalities}")
    context, trained = data.context_slices(samples, path), run.meta.get(data.CONTEXT_KEY, 0)
    if context != trained:
        raise DataError(f"{path}: rows with \"{data.CONTEXT_KEY}\" {context}, but the checkpoint "
                        f"{run.folder} was trained on {trained} (its pictures are made another "
                        f"way: prepare.py brats --context-slices)")
    order = [file_mods.index(m) for m in modalities]  # the same modalities in the model's order
    for s in samples:
        s.paths = [s.paths[k] for k in order]
    return samples


def demo_samples(run, n=4):
    """No input: the first n validation rows the checkpoint was scored on (its val.jsonl)."""
    if not run.val_rows.exists():
        raise DataError(f"nothing to answer: give --images, --data or --volume ({run.val_rows} is "
                        f"missing: a checkpoint from an older train.py)")
    return rows_samples(run, run.val_rows, run.meta["box_format"])[:n]


def draw(sample, modalities, pred, path):
    """The modalities side by side, the answer in red (none drawn for "no tumour": pred None) and
    the true box (when known) in green."""
    tiles = [Image.open(p).convert("RGB") for p in sample.paths]
    W, H = sample.size
    sheet = Image.new("RGB", (W * len(tiles), H + 16), "black")
    d = ImageDraw.Draw(sheet)
    for k, (tile, name) in enumerate(zip(tiles, modalities)):
        sheet.paste(tile, (k * W, 16))
        d.text((k * W + 2, 2), name, fill="white")
        for box, color in ([(b, (0, 220, 0)) for b in sample.boxes]
                           + [(pred, (255, 40, 40))] * (pred is not None)):
            x0, y0, x1, y1 = box
            d.rectangle([k * W + x0, 16 + y0, k * W + x1, 16 + y1], outline=color, width=2)
    sheet.save(path)


# -----------------------------------------------------------------------------
# Whole studies: every slice of a NIfTI study, then one 3-D box from the slices' answers

# "no tumour" slices between two tumour slices are bridged (one run) up to this far (see gap_slices)
MAX_GAP_MM = 4.0
# the tumour's run grows at each end over neighbouring slices with p_tumour at least this
# (extend_run). Within 8 slices past a run's ends on held-out studies, 0.28 of the tumour slices
# and 0.075 of the others had p >= 0.1 (median p 0.040 against 0.010; docs/results.md "The
# tumour's ends" and "The ends' threshold, again")
END_AT = 0.1
# the 3-D box's width in the slice plane comes from the run's slices answered with p_tumour at least
# this; the others (the run's less sure slices, its grown ends) add depth only (study_box; chosen on
# held-out whole-study runs, docs/results.md "The box's width from the sure slices")
BOX_AT = 0.9
# the run, grown, is then padded by this much tissue at each end (margin_slices, extend_run): the
# thinnest end sections, a few dozen tumour pixels, are answered "no tumour" as surely as slices
# without tumour, so on held-out studies the run stopped short of the tumour at 38 of 40 ends, by
# a median of 4.5 slices of 1 mm (chosen on held-out whole-study runs, docs/results.md "The run's
# margin")
MARGIN_MM = 2.0


def study_files(volume, modalities, brainmask=None):
    """--volume CASE_DIR (holding <case>-<modality>.nii.gz for the checkpoint's modalities, and
    maybe <case>-brainmask.nii.gz), or one file per modality in the checkpoint's order -> (paths,
    brain mask or None)."""
    names = [m.split()[0] for m in modalities]  # "t2f Axial" -> "t2f"
    if len(volume) == 1 and Path(volume[0]).is_dir():
        d = Path(volume[0])
        paths = [prepare.case_file(d, n) for n in names]
        missing = [f"{d.name}-{n}.nii.gz" for n, p in zip(names, paths) if p is None]
        if missing:
            raise DataError(f"{d}: no {', '.join(missing)} "
                            f"(the checkpoint reads {', '.join(names)})")
        return paths, brainmask or prepare.case_file(d, "brainmask")
    if len(volume) == 1 and not Path(volume[0]).exists():
        raise DataError(f"{volume[0]}: not found (give a case folder or one volume per modality)")
    if len(volume) != len(names):
        raise DataError(f"got {len(volume)} volumes, but the checkpoint expects {len(names)}, "
                        f"one per modality in this order: {', '.join(names)} "
                        f"(or give a case folder)")
    return [Path(p) for p in volume], brainmask


def trained_view(modalities):
    """The view the checkpoint was trained on, from its keys ("t2f Axial" -> "axial")."""
    view = modalities[0].split()[-1].lower()
    if view not in prepare.VIEWS:
        raise DataError(f"the checkpoint was trained on {modalities[0]!r} images, not on one of "
                        f"the views {', '.join(prepare.VIEWS)}; --volume cannot tell which "
                        f"slices to answer")
    return view


def slice_spacing(grid, view):
    """Millimetres between a study's slices of the view, from the file's affine."""
    axis = grid.axes[prepare.VIEW_AXIS[view]]  # the file's voxel axis across the view's slices
    return float(np.linalg.norm(grid.affine[:3, axis]))


def gap_slices(grid, view):
    """How many "no tumour" slices tumour_runs bridges in a study: floor(MAX_GAP_MM / the spacing
    of the view's slices). The rule was chosen as 4 slices on 1 mm BraTS studies
    (docs/results.md, "The run rule"), where a miss inside a tumour is a section too small or
    faint to answer; in millimetres it bridges the same depth of tissue at any spacing: 4 slices
    of 1 mm, 2 of 2 mm, none of 5 mm, where one missed slice puts 10 mm between tumour slices and a
    1 mm study joins tumour slices at most 5 mm apart."""
    return int(MAX_GAP_MM / slice_spacing(grid, view) + 1e-6)  # 4 / 1.0000001 mm: still 4


def margin_slices(grid, view):
    """How many slices the run's margin adds at each end (extend_run): floor(MARGIN_MM / the
    spacing), 2 of 1 mm, 1 of 2 mm, none of 3 mm or more (a 5 mm slice at the tumour's end already
    holds the end's millimetres)."""
    return int(MARGIN_MM / slice_spacing(grid, view) + 1e-6)


def tumour_runs(slices, max_gap=4):
    """Slice indices answered "tumour" -> (kept, bridged, dropped), each sorted. Slices at most
    max_gap + 1 apart (gap_slices: 4 on 1 mm slices) join one run (the up to max_gap "no tumour"
    slices between them, a miss inside the tumour, are bridged); the longest run (the first of
    equals) is the tumour and is kept; every other run, such as a lone positive slice or a few far
    from the tumour, is dropped as an outlier. One run: a whole tumour, oedema included, is one
    stretch of slices; a second focus further than max_gap slices away is dropped with the outliers
    (see docs/results.md, "The run rule": what keeping runs of 3 or more slices did on held-out
    patients)."""
    runs = []
    for k in sorted(slices):
        if runs and k - runs[-1][-1] <= max_gap + 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    kept = max(runs, key=len, default=[])
    bridged = [k for a, b in zip(kept, kept[1:]) for k in range(a + 1, b)]
    return kept, bridged, sorted(set(slices) - set(kept))


def extend_run(kept, p, low, most=None):
    """Hysteresis at the tumour's ends: the kept run (sorted slice indices) grows outward, slice by
    slice, while the next slice's p_tumour (p: brain slice -> probability) is at least low, by at
    most `most` slices at each end (None: no limit). A run starts only where the model is sure
    (PRESENT_AT); its ends, sections of a few dozen tumour pixels, are answered less surely, and a
    slice next to a sure run is more likely tumour than one alone. With low 0 and most n, the run's
    margin: n slices at each end whatever their p. -> (the run, the added slices)."""
    if not kept:
        return kept, []
    most = len(p) if most is None else most
    lo, hi = kept[0], kept[-1]
    while kept[0] - lo < most and lo - 1 in p and p[lo - 1] >= low:  # p: the brain slices only
        lo -= 1
    while hi - kept[-1] < most and hi + 1 in p and p[hi + 1] >= low:
        hi += 1
    added = list(range(lo, kept[0])) + list(range(kept[-1] + 1, hi + 1))
    return sorted(kept + added), added


def study_box(answers, kept, view, shape, wide=None):
    """The 3-D box of the kept slices: answers {slice k: pixel box on slice k}, kept slice indices,
    the RAS volume's shape, wide: the kept slices whose boxes set the width (None: all) -> RAS
    voxel edges [x0, y0, z0, x1, y1, z1]: the union of the wide slices' boxes in the slice plane,
    the first to the last kept slice across it. answer_study passes the slices answered with p at
    least BOX_AT as wide: a box answered on a slice the model is unsure of, a tumour's small end
    section mostly, is the least sure box, and one misplaced there widened the whole 3-D box."""
    axis = prepare.VIEW_AXIS[view]
    boxes = np.array([prepare.volume_box(answers[k], view, k, shape) for k in (wide or kept)],
                     dtype=np.float64)
    box = np.concatenate([boxes[:, :3].min(0), boxes[:, 3:].max(0)])
    box[axis], box[axis + 3] = min(kept), max(kept) + 1  # the depth: every kept slice
    return [int(round(v)) for v in box]


@dataclass
class Study:
    """A whole study's answer. Slices and boxes inside are in the RAS volume read by
    prepare.read_study; lines and summary (the output) are in the file's own voxels."""
    lines: list  # one dict per tumour slice, in the file's slice order
    summary: dict  # the 3-D box, slice range, counts, seconds
    images: list  # the modalities' RAS volumes (X, Y, Z) uint8, windowed
    view: str  # the trained view: its slices were answered
    answers: dict  # RAS slice k -> its pixel box [x0, y0, x1, y1], for the slices answered "tumour"
    kept: list  # the RAS slices of the tumour's run (tumour_runs)
    box: list | None  # RAS voxel edges [x0, y0, z0, x1, y1, z1] of the 3-D box, None: no tumour
    grid: prepare.Grid  # RAS <-> the file's voxels and millimetres
    margin: list  # the RAS slices the run's margin added (MARGIN_MM): answered "no tumour"

    def file_slice(self, k):
        """RAS slice k of the view -> its number in the file."""
        return (self.grid.to_file([k] * 3 + [k + 1] * 3)
                [self.grid.axes[prepare.VIEW_AXIS[self.view]]])


@torch.no_grad()
def answer_study(run, volume, brainmask, device, pad=False):
    """Read, window and answer every brain slice of a study (--volume, --brainmask). -> Study."""
    t0 = time.time()
    meta = run.meta
    paths, brainmask = study_files(volume, meta["modalities"], brainmask)
    images, brain, grid = prepare.read_study(paths, brainmask)
    view = trained_view(meta["modalities"])
    ks = [int(k) for k in np.nonzero(prepare.brain_slices(brain, view))[0]]
    context = meta.get(data.CONTEXT_KEY, 0)  # pictures of slices k - c, k, k + c (0: slice k)
    windows = {}  # slice k -> the window [x0, y0, w, h] its pictures were read through

    def read(k):  # the converter's picture of each modality's slice k, read as training read it
        ims = [data.open_image(io.BytesIO(prepare.slice_image(v, view, k, context)))
               for v in images]
        x, windows[k] = data.read_window(ims, meta["image_size"], meta["mean"], meta["std"],
                                         meta.get("crop", "none"))
        return x

    boxes, probs = predict(run.model, ks, read, device, pad=pad)
    p = dict(zip(ks, probs.tolist()))
    box = {k: data.to_pixels(b, windows[k]) for k, b in zip(ks, boxes)}
    answers = {k: box[k] for k in ks if p[k] >= PRESENT_AT}
    kept, bridged, dropped = tumour_runs(list(answers), gap_slices(grid, view))
    kept, added = extend_run(kept, p, END_AT)
    kept, padded = extend_run(kept, p, 0.0, margin_slices(grid, view))  # the margin
    dropped = [k for k in dropped if k not in kept]  # an outlier the run reached is the run's
    answers.update({k: box[k] for k in added + padded})
    study = Study([], {}, images, view, answers, kept, None, grid, padded)
    file_axis = grid.axes[prepare.VIEW_AXIS[view]]
    for k in sorted(answers, key=study.file_slice):  # in the file's slice order
        vox = grid.to_file([int(round(v)) for v in prepare.volume_box(answers[k], view, k,
                                                                     images[0].shape)])
        study.lines.append(dict(slice=vox[file_axis], p_tumour=round(p[k], 4), box_voxels=vox,
                                box_mm=grid.to_mm(vox), outlier=k in dropped,
                                margin=k in padded))
    summary = dict(study=" ".join(map(str, volume)), view=view,
                   slices=images[0].shape[prepare.VIEW_AXIS[view]], brain_slices=len(ks),
                   tumour_slices=len(kept))
    if kept:
        # the width: the sure slices; none sure, every slice of the run but the margin's, whose
        # boxes are the model's on slices it answered "no tumour"
        unpadded = [k for k in kept if k not in padded]
        wide = [k for k in unpadded if p[k] >= BOX_AT] or unpadded
        study.box = study_box(answers, kept, view, images[0].shape, wide)
        vox = grid.to_file(study.box)
        summary.update(box_voxels=vox, box_mm=grid.to_mm(vox),
                       slice_range=[vox[file_axis], vox[file_axis + 3] - 1],
                       bridged_slices=sorted(study.file_slice(k) for k in bridged),
                       grown_slices=sorted(study.file_slice(k) for k in added),
                       margin_slices=sorted(study.file_slice(k) for k in padded),
                       dropped_slices=sorted(study.file_slice(k) for k in dropped),
                       depth_only_slices=sorted(study.file_slice(k) for k in kept
                                                if k not in wide))
    else:
        summary.update(box_voxels=None, box_mm=None, answer="no tumour")
    summary["seconds"] = round(time.time() - t0, 2)
    study.summary = summary
    return study


def box_labels(study):
    """The study's answer as a label volume (RAS, uint8, the study's shape) for a viewer to lay
    over it: 1 in the 3-D box, 2 in each kept tumour slice's own box inside it (drawn over the 1,
    which shows where the union widened the box and which slices were bridged or added by the
    margin: those have no box of their own); all 0 for "no tumour". Its voxels > 0 span exactly
    the 3-D box: a depth-only slice's box (study_box) may reach past the box, and is cut at its
    edges."""
    shape = study.images[0].shape
    labels = np.zeros(shape, np.uint8)
    if study.box:
        outer = study.box
        x0, y0, z0, x1, y1, z1 = outer
        labels[x0:x1, y0:y1, z0:z1] = 1
        for k in (k for k in study.kept if k not in study.margin):
            box = [int(round(v)) for v in prepare.volume_box(study.answers[k], study.view, k,
                                                             shape)]
            x0, y0, z0 = [max(a, b) for a, b in zip(box[:3], outer[:3])]
            x1, y1, z1 = [min(a, b) for a, b in zip(box[3:], outer[3:])]
            labels[x0:x1, y0:y1, z0:z1] = 2
    return labels


def draw_study(study, modalities, path, tiles=12, tile=160):
    """The picture a reader checks: top, three orthogonal views through the 3-D box's centre with
    the box; below, up to `tiles` of the kept tumour slices, evenly spread, each with its own
    answered box (the margin's slices with none). First modality only (FLAIR in BraTS order: the
    whole tumour is brightest there). The labels show the file's slice numbers."""
    vol, view, kept, box = study.images[0], study.view, study.kept, study.box
    shape, cols = vol.shape, 4
    name = modalities[0].split()[0]
    s = study.summary
    title = (f"{name}: tumour on {s['tumour_slices']} slices {s['slice_range']}, 3-D box "
             f"{s['box_voxels']} voxels" if kept else f"{name}: no tumour")
    picks = [kept[round(i * (len(kept) - 1) / max(1, tiles - 1))]
             for i in range(min(tiles, len(kept)))]
    picks = list(dict.fromkeys(picks))  # the same slice once
    rows = 1 + (len(picks) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * tile, rows * (tile + 14) + 16), "black")
    d = ImageDraw.Draw(sheet)
    d.text((4, 2), title, fill="white")

    def put(img, rect, x, y, label):  # a slice scaled into a tile, its box in red
        h, w = img.shape
        f = tile / max(h, w)
        pic = Image.fromarray(np.ascontiguousarray(img)).convert("RGB")
        sheet.paste(pic.resize((round(w * f), round(h * f))), (x, y + 14))
        d.text((x + 2, y + 1), label, fill=(255, 255, 0))
        if rect is not None:
            x0, y0, x1, y1 = rect
            d.rectangle([x + x0 * f, y + 14 + y0 * f, x + x1 * f - 1, y + 14 + y1 * f - 1],
                        outline=(255, 40, 40), width=2)

    centre = [(box[a] + box[a + 3]) // 2 for a in range(3)] if box else [n // 2 for n in shape]
    for j, v in enumerate(prepare.VIEWS):
        put(prepare.view_slice(vol, v, centre[prepare.VIEW_AXIS[v]]),
            prepare.image_box(box, v, shape) if box else None, j * tile, 16,
            f"{v} through the box" if box else v)
    for i, k in enumerate(picks):
        margin = k in study.margin  # answered "no tumour": no box of its own
        put(prepare.view_slice(vol, view, k), None if margin else study.answers[k],
            (i % cols) * tile, 16 + (1 + i // cols) * (tile + 14),
            f"{view} slice {study.file_slice(k)}" + (" (margin)" if margin else ""))
    sheet.save(path)


def write_lines(lines, out, what):
    """JSON lines to --out (with a note on stderr) or to stdout."""
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if out:
        Path(out).write_text(text)
        print(f"wrote {what} to {out}", file=sys.stderr)
    else:
        print(text, end="")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message} (see --help)")  # one line, not the usage
    p.add_argument("--images", nargs="+",
                   help="one image per modality, in the checkpoint's order (the error says which)")
    p.add_argument("--data", help="a summary.jsonl: answer every row (batched); scored when its "
                                  "rows carry boxes")
    p.add_argument("--volume", nargs="+", metavar="PATH",
                   help="a whole NIfTI study: a case folder holding <case>-<modality>.nii.gz, or "
                        "one volume per modality in the checkpoint's order; answers every slice of "
                        "the trained view and the tumour's 3-D box")
    p.add_argument("--brainmask", help="with --volume: the study's brain mask (default: "
                                       "<case>-brainmask.nii.gz in a case folder, else the voxels "
                                       "that are not zero, else the head found in the study)")
    p.add_argument("--out", help="write the JSON lines here (default: stdout)")
    p.add_argument("--ckpt", default="out",
                   help="checkpoint folder, or train.py's --out folder (default out/)")
    p.add_argument("--box-format", choices=["corners", "xywh"],
                   help="corners: [maxx, maxy, minx, miny]; xywh: COCO [x, y, w, h] (default: the "
                        "training data's)")
    p.add_argument("--draw", help="PNG: the modalities side by side with the answered box (red) "
                                  "and the true one (green); with --volume, three views through "
                                  "the 3-D box and the tumour slices with their boxes")
    p.add_argument("--save-nifti", metavar="LABELS.nii.gz",
                   help="with --volume: write the answer as a label volume on the study's grid and "
                        "affine (1: the 3-D box, 2: each tumour slice's own box), to lay over the "
                        "study in ITK-SNAP or 3D Slicer")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="hold the weights in bf16 for answering (default: on CUDA)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode step, with CUDA graphs on CUDA; pays off over many "
                        "rows (default: on CUDA with --data)")
    args = p.parse_args(argv)
    if sum(bool(x) for x in (args.images, args.data, args.volume)) > 1:
        p.error("give one of --images, --data and --volume")
    if args.save_nifti and not args.volume:
        p.error("--save-nifti writes a whole study's boxes: give the study with --volume")
    if args.save_nifti and not args.save_nifti.endswith((".nii.gz", ".nii")):
        p.error(f"--save-nifti {args.save_nifti}: expected a name ending in .nii.gz or .nii")
    cuda = args.device.startswith("cuda")
    if args.bf16 is None:
        args.bf16 = cuda
    if args.compile is None:
        args.compile = cuda and args.data is not None
    return args


def main(argv=None):
    args = get_args(argv)
    run = Run(*load_checkpoint(args.ckpt))
    run.model.to(args.device, torch.bfloat16 if args.bf16 else torch.float32)
    if args.compile:
        run.model.compile_decode()
    box_format = args.box_format or run.meta["box_format"]

    if args.volume:
        study = answer_study(run, args.volume, args.brainmask, args.device, pad=args.compile)
        write_lines(study.lines + [study.summary], args.out,
                    f"{len(study.lines)} tumour slices and the summary")
        if args.draw:
            draw_study(study, run.meta["modalities"], args.draw)
            print(f"drew {args.draw}", file=sys.stderr)
        if args.save_nifti:
            prepare.write_nifti(args.save_nifti, box_labels(study), study.grid,
                                "minigpt-mri: 1 = 3-D box, 2 = slice boxes")
            print(f"wrote the boxes to {args.save_nifti}", file=sys.stderr)
        return
    if args.images:
        samples = images_samples(run, args.images)
    elif args.data:
        samples = rows_samples(run, args.data, box_format)
    else:
        samples = demo_samples(run)
    rows, preds = answer_samples(run, samples, args.device, args.compile, box_format,
                                 with_paths=not args.images)
    write_lines(rows, args.out, f"{len(rows)} predictions")
    if args.draw:
        draw(samples[0], run.meta["modalities"], preds[0], args.draw)
        print(f"drew {args.draw}", file=sys.stderr)
    if any(s.boxes for s in samples):  # rows with a true box: IoU; with "box": [] rows, presence
        n_pos = sum(bool(s.boxes) for s in samples)
        print(f"{data.score_line(data.score_boxes(preds, samples))}: IoU on the {n_pos} rows "
              f"with a box" + (f", presence on all {len(samples)}" if n_pos < len(samples) else ""),
              file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError) as e:  # the user's input: one line, no traceback
        sys.exit(f"error: {e}")

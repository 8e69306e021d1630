"""
Ask a trained minigpt-mri model where the tumour is.

    python sample.py --images t2f.jpg t2w.jpg t1n.jpg t1c.jpg [--ckpt out] [--draw answer.png]
    python sample.py --data val.jsonl --out pred.jsonl [--ckpt out]
    python sample.py --volume CASE_DIR [--draw study.png]   # a whole NIfTI study: <case>-<modality>.nii.gz
    python sample.py --volume t2f.nii.gz t1n.nii.gz          # or one volume per modality
    python sample.py                      # the first validation rows of the demo data that train.py made

One image per modality, in the checkpoint's order. The answer is one JSON line: the box in the training
data's corner order (by default [maxx, maxy, minx, miny]; --box-format xywh gives COCO [x, y, w, h]),
in pixels of the image size it names, or "box": [] for "no tumour".

A whole study (--volume) is read and windowed as prepare.py's converter does it, and every slice of the
trained view that shows brain is answered: one JSON line per slice with a tumour, then a summary line
with the tumour's 3-D box in the file's voxels and in millimetres (see study_box).
"""

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import prepare
from model import PRESENT_AT, CheckpointError, MiniGPT


def find_checkpoint(path):
    """A checkpoint folder holds model.safetensors; train.py's --out folder holds one under ckpt/."""
    path = Path(path)
    for folder in (path, path / "ckpt"):
        if (folder / "model.safetensors").exists() and (folder / "config.json").exists():
            return folder
    sys.exit(f"error: no checkpoint in {path}: expected {path / 'ckpt' / 'model.safetensors'} (train one with "
             f"`python train.py --out {path}`) or a folder holding model.safetensors and config.json")


def load(ckpt):
    """-> model (eval mode), its data settings (modalities, image size, normalisation, ...), tokenizer."""
    model = MiniGPT.from_checkpoint(ckpt)
    meta = json.loads((ckpt / "config.json").read_text()).get("meta")
    if not isinstance(meta, dict) or "modalities" not in meta:
        raise CheckpointError(f"{ckpt / 'config.json'}: no \"meta\" with the data settings (not written by train.py)")
    if not (ckpt / "tokenizer.model").is_file():
        raise CheckpointError(f"{ckpt / 'tokenizer.model'}: missing (train.py writes it beside the weights)")
    tokenizer = data.Tokenizer(ckpt / "tokenizer.model", model.cfg.num_bins)
    return model.eval(), meta, tokenizer


@torch.no_grad()
def predict(model, items, load, device, batch_size=32, pad=False):
    """Answer every item in batches of batch_size: load(item) -> its images (N, 3, S, S). -> boxes (M, 4)
    normalised [x0, y0, x1, y1] and p (M,), the probability of a tumour (the answer is "no tumour" where
    p < PRESENT_AT). pad=True fills the last batch up (repeating its last item) so that a compiled decode step
    sees one batch shape only."""
    boxes, probs, dtype = [], [], next(model.parameters()).dtype  # inputs in the weights' dtype (bf16 with --bf16)
    for i in range(0, len(items), batch_size):
        chunk = items[i: i + batch_size]
        x = torch.stack([load(item) for item in chunk])
        if pad and len(items) > batch_size and len(chunk) < batch_size:
            x = torch.cat([x, x[-1:].expand(batch_size - len(chunk), *x.shape[1:])])
        b, p = model.answer_boxes(x.to(device, dtype))
        boxes.append(b.float().cpu()[: len(chunk)])
        probs.append(p.float().cpu()[: len(chunk)])
    return torch.cat(boxes), torch.cat(probs)


def draw(sample, modalities, pred, path):
    """The modalities side by side, the answer in red (none drawn for "no tumour": pred None) and the
    true box (when known) in green."""
    tiles = [Image.open(p).convert("RGB") for p in sample.paths]
    W, H = sample.size
    sheet = Image.new("RGB", (W * len(tiles), H + 16), "black")
    d = ImageDraw.Draw(sheet)
    for k, (tile, name) in enumerate(zip(tiles, modalities)):
        sheet.paste(tile, (k * W, 16))
        d.text((k * W + 2, 2), name, fill="white")
        for box, color in [(b, (0, 220, 0)) for b in sample.boxes] + [(pred, (255, 40, 40))] * (pred is not None):
            x0, y0, x1, y1 = box
            d.rectangle([k * W + x0, 16 + y0, k * W + x1, 16 + y1], outline=color, width=2)
    sheet.save(path)


# -----------------------------------------------------------------------------
# Whole studies: every slice of a NIfTI study, then one 3-D box from the slices' answers

MAX_GAP = 4  # up to this many "no tumour" slices between two tumour slices are bridged (one run)


def study_files(volume, modalities, brainmask=None):
    """--volume CASE_DIR (holding <case>-<modality>.nii.gz for the checkpoint's modalities, and maybe
    <case>-brainmask.nii.gz), or one file per modality in the checkpoint's order -> (paths, brain mask or None)."""
    names = [m.split()[0] for m in modalities]  # "t2f Axial" -> "t2f"
    if len(volume) == 1 and Path(volume[0]).is_dir():
        d = Path(volume[0])
        paths = [prepare.case_file(d, n) for n in names]
        missing = [f"{d.name}-{n}.nii.gz" for n, p in zip(names, paths) if p is None]
        if missing:
            raise data.DataError(f"{d}: no {', '.join(missing)} (the checkpoint reads {', '.join(names)})")
        return paths, brainmask or prepare.case_file(d, "brainmask")
    if len(volume) == 1 and not Path(volume[0]).exists():
        raise data.DataError(f"{volume[0]}: not found (give a case folder or one volume per modality)")
    if len(volume) != len(names):
        raise data.DataError(f"got {len(volume)} volumes, but the checkpoint expects {len(names)}, one per modality in "
                             f"this order: {', '.join(names)} (or give a case folder)")
    return [Path(p) for p in volume], brainmask


def trained_view(modalities):
    """The view the checkpoint was trained on, from its keys ("t2f Axial" -> "axial")."""
    view = modalities[0].split()[-1].lower()
    if view not in prepare.VIEWS:
        raise data.DataError(f"the checkpoint was trained on {modalities[0]!r} images, not on one of the views "
                             f"{', '.join(prepare.VIEWS)}; --volume cannot tell which slices to answer")
    return view


def tumour_runs(slices, max_gap=MAX_GAP):
    """Slice indices answered "tumour" -> (kept, bridged, dropped), each sorted. Slices at most
    max_gap + 1 apart join one run (the up to max_gap "no tumour" slices between them, a miss inside the
    tumour, are bridged); the longest run (the first of equals) is the tumour and is kept; every other
    run, such as a lone positive slice or a few far from the tumour, is dropped as an outlier. One run:
    a whole tumour, oedema included, is one stretch of slices; a second focus further than max_gap
    slices away is dropped with the outliers (see README, Results: what keeping runs of 3 or more
    slices did on held-out patients)."""
    runs = []
    for k in sorted(slices):
        if runs and k - runs[-1][-1] <= max_gap + 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    kept = max(runs, key=len, default=[])
    bridged = [k for a, b in zip(kept, kept[1:]) for k in range(a + 1, b)]
    return kept, bridged, sorted(set(slices) - set(kept))


def study_box(answers, kept, view, shape):
    """The 3-D box of the kept slices: answers {slice k: pixel box on slice k}, kept slice indices, the
    RAS volume's shape -> RAS voxel edges [x0, y0, z0, x1, y1, z1]: the union of their boxes in the
    slice plane, the first to the last kept slice across it."""
    boxes = np.array([prepare.volume_box(answers[k], view, k, shape) for k in kept], dtype=np.float64)
    return [int(round(v)) for v in np.concatenate([boxes[:, :3].min(0), boxes[:, 3:].max(0)])]


@torch.no_grad()
def answer_study(model, meta, paths, brainmask, device, pad=False):
    """Read, window and answer every brain slice of a study. -> (lines: one dict per slice with a tumour,
    then the summary dict; the drawing's inputs)."""
    t0 = time.time()
    images, brain, grid = prepare.read_study(paths, brainmask)
    view = trained_view(meta["modalities"])
    axis = prepare.VIEW_AXIS[view]
    ks = [int(k) for k in np.nonzero(prepare.brain_slices(brain, view))[0]]
    H, W = prepare.view_slice(images[0], view, 0).shape

    def read(k):  # the converter's JPEG of each modality's slice k, read as training read it
        return torch.stack([data.load_image(io.BytesIO(prepare.slice_jpeg(v, view, k)), meta["image_size"],
                                            meta["mean"], meta["std"]) for v in images])

    boxes, probs = predict(model, ks, read, device, pad=pad)
    p = dict(zip(ks, probs.tolist()))
    answers = {k: data.to_pixels(b, (W, H)) for k, b, q in zip(ks, boxes, probs) if q >= PRESENT_AT}
    kept, bridged, dropped = tumour_runs(list(answers))
    file_axis = grid.axes[axis]
    in_file = lambda ras_box: grid.to_file([int(round(v)) for v in ras_box])
    file_slice = lambda k: grid.to_file([k] * 3 + [k + 1] * 3)[file_axis]  # RAS slice k -> its index in the file
    lines = []
    for k in sorted(answers, key=file_slice):  # in the file's slice order
        vox = in_file(prepare.volume_box(answers[k], view, k, images[0].shape))
        lines.append(dict(slice=vox[file_axis], p_tumour=round(p[k], 4), box_voxels=vox, box_mm=grid.to_mm(vox),
                          outlier=k in dropped))
    summary = dict(view=view, slices=images[0].shape[axis], brain_slices=len(ks), tumour_slices=len(kept))
    box = None
    if kept:
        box = study_box(answers, kept, view, images[0].shape)
        vox = grid.to_file(box)
        summary.update(box_voxels=vox, box_mm=grid.to_mm(vox), slice_range=[vox[file_axis], vox[file_axis + 3] - 1],
                       bridged_slices=sorted(file_slice(k) for k in bridged),
                       dropped_slices=sorted(file_slice(k) for k in dropped))
    else:
        summary.update(box_voxels=None, box_mm=None, answer="no tumour")
    summary["seconds"] = round(time.time() - t0, 2)
    return lines, summary, (images, view, answers, kept, box, file_slice)


def draw_study(images, view, answers, kept, box, file_slice, title, path, tiles=12, tile=160):
    """The picture a reader checks: top, three orthogonal views through the 3-D box's centre with the box;
    below, up to `tiles` of the kept tumour slices, evenly spread, each with its own answered box. First
    modality only (FLAIR in BraTS order: the whole tumour is brightest there). Boxes and slices are RAS
    (see answer_study); file_slice(k) is slice k's number in the file, which the labels show."""
    vol = images[0]
    shape = vol.shape
    cols = 4
    picks = [kept[round(i * (len(kept) - 1) / max(1, tiles - 1))] for i in range(min(tiles, len(kept)))]
    picks = list(dict.fromkeys(picks))  # the same slice once
    rows = 1 + (len(picks) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * tile, rows * (tile + 14) + 16), "black")
    d = ImageDraw.Draw(sheet)
    d.text((4, 2), title, fill="white")

    def put(img, rect, x, y, label):  # a slice scaled into a tile, its box in red
        h, w = img.shape
        f = tile / max(h, w)
        sheet.paste(Image.fromarray(np.ascontiguousarray(img)).convert("RGB").resize((round(w * f), round(h * f))), (x, y + 14))
        d.text((x + 2, y + 1), label, fill=(255, 255, 0))
        if rect is not None:
            x0, y0, x1, y1 = rect
            d.rectangle([x + x0 * f, y + 14 + y0 * f, x + x1 * f - 1, y + 14 + y1 * f - 1], outline=(255, 40, 40), width=2)

    centre = [(box[a] + box[a + 3]) // 2 for a in range(3)] if box else [n // 2 for n in shape]
    for j, v in enumerate(prepare.VIEWS):
        put(prepare.view_slice(vol, v, centre[prepare.VIEW_AXIS[v]]), prepare.image_box(box, v, shape) if box else None,
            j * tile, 16, f"{v} through the box" if box else v)
    for i, k in enumerate(picks):
        put(prepare.view_slice(vol, view, k), answers[k], (i % cols) * tile, 16 + (1 + i // cols) * (tile + 14),
            f"{view} slice {file_slice(k)}")
    sheet.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message} (see --help)")  # one line, not the whole usage
    p.add_argument("--images", nargs="+", help="one image per modality, in the checkpoint's order (see the error for which)")
    p.add_argument("--data", help="a summary.jsonl: answer every row (batched); scored when its rows carry boxes")
    p.add_argument("--volume", nargs="+", metavar="PATH",
                   help="a whole NIfTI study: a case folder holding <case>-<modality>.nii.gz, or one volume per modality "
                        "in the checkpoint's order; answers every slice of the trained view and the tumour's 3-D box")
    p.add_argument("--brainmask", help="with --volume: the study's brain mask (default: <case>-brainmask.nii.gz in a "
                                       "case folder, else the voxels that are not zero)")
    p.add_argument("--out", help="with --data: write predictions here, one JSON line per input line; with --volume: "
                                 "its JSON lines (default: stdout)")
    p.add_argument("--ckpt", default="out", help="checkpoint folder, or train.py's --out folder (default out/)")
    p.add_argument("--box-format", choices=["corners", "xywh"],
                   help="corners: [maxx, maxy, minx, miny]; xywh: COCO [x, y, w, h] (default: the training data's)")
    p.add_argument("--draw", help="PNG: the modalities side by side with the answered box (red) and the true one (green); "
                                  "with --volume, three views through the 3-D box and the tumour slices with their boxes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="hold the weights in bf16 for answering (default: on CUDA)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode step, with CUDA graphs on CUDA; pays off over many rows (default: on CUDA with --data)")
    args = p.parse_args(argv)
    if sum(bool(x) for x in (args.images, args.data, args.volume)) > 1:
        p.error("give one of --images, --data and --volume")

    ckpt = find_checkpoint(args.ckpt)
    model, meta, tokenizer = load(ckpt)
    cuda = args.device.startswith("cuda")
    model.to(args.device, torch.bfloat16 if (cuda if args.bf16 is None else args.bf16) else torch.float32)
    if (cuda and args.data is not None) if args.compile is None else args.compile:
        model.compile_decode()
        args.compile = True
    modalities = meta["modalities"]
    box_format = args.box_format or meta["box_format"]

    if args.volume:
        paths, brainmask = study_files(args.volume, modalities, args.brainmask)
        lines, summary, drawing = answer_study(model, meta, paths, brainmask, args.device, pad=bool(args.compile))
        summary = {"study": " ".join(args.volume), **summary}
        text = "".join(json.dumps(l) + "\n" for l in lines + [summary])
        if args.out:
            Path(args.out).write_text(text)
            print(f"wrote {len(lines)} tumour slices and the summary to {args.out}", file=sys.stderr)
        else:
            print(text, end="")
        if args.draw:
            title = (f"{modalities[0].split()[0]}: tumour on {summary['tumour_slices']} slices "
                     f"{summary['slice_range']}, 3-D box {summary['box_voxels']} voxels" if summary["tumour_slices"]
                     else f"{modalities[0].split()[0]}: no tumour")
            draw_study(*drawing, title, args.draw)
            print(f"drew {args.draw}", file=sys.stderr)
        return
    if args.images:
        if len(args.images) != len(modalities):
            sys.exit(f"error: got {len(args.images)} images, but the checkpoint {ckpt} expects {len(modalities)}, "
                     f"one per modality in this order: {', '.join(modalities)}")
        samples = [data.sample_from_images(args.images)]
    elif args.data:
        file_mods, samples = data.read_summary(args.data, box_format=box_format, require_boxes=False)
        if sorted(file_mods) != sorted(modalities):
            sys.exit(f"error: {args.data}: modalities {file_mods} differ from the checkpoint's {modalities}")
        order = [file_mods.index(m) for m in modalities]  # the same modalities in another key order: the model's
        for s in samples:
            s.paths = [s.paths[k] for k in order]
    else:  # the embedded demo: a few validation rows of the data the checkpoint was trained on
        train_args = meta["args"]
        path = train_args["val"] or train_args["data"]
        if not Path(path).exists():
            sys.exit(f"error: nothing to answer: give --images or --data (the training data {path} is not at hand)")
        _, samples = data.read_summary(path, box_format=meta["box_format"])
        if not train_args["val"]:
            samples = data.split_by_patient(samples, train_args["val_fraction"], train_args["seed"])[1]
        samples = samples[:4]

    read = lambda s: data.load_images(s, meta["image_size"], meta["mean"], meta["std"])
    boxes, probs = predict(model, samples, read, args.device, pad=bool(args.compile))
    preds = [data.to_pixels(b, s.size) if p >= PRESENT_AT else None for b, p, s in zip(boxes, probs, samples)]
    lines = []
    for s, pred, p in zip(samples, preds, probs):
        row = {} if args.images else {k: v for k, v in s.row.items() if k.endswith("_path")}
        row["box"] = [data.box_to_output(pred, box_format)] if pred is not None else []  # []: "no tumour"
        row["p_tumour"] = round(float(p), 4)
        row["size"] = list(s.size)  # (W, H): the pixels the box refers to
        lines.append(json.dumps(row))
    if args.out:
        Path(args.out).write_text("".join(l + "\n" for l in lines))
        print(f"wrote {len(lines)} predictions to {args.out}", file=sys.stderr)
    else:
        print("\n".join(lines))
    if args.draw:
        draw(samples[0], modalities, preds[0], args.draw)
        print(f"drew {args.draw}", file=sys.stderr)
    if any(s.boxes for s in samples):  # rows with a true box: IoU; with rows of "box": [] too, presence
        n_pos = sum(bool(s.boxes) for s in samples)
        print(f"{data.score_line(data.score_boxes(preds, samples))}: IoU on the {n_pos} rows with a box"
              + (f", presence on all {len(samples)}" if n_pos < len(samples) else ""), file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (data.DataError, CheckpointError) as e:  # the user's input: one line, no traceback
        sys.exit(f"error: {e}")

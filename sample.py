"""
Ask a trained minigpt-mri model where the tumour is.

    python sample.py --images t2f.jpg t2w.jpg t1n.jpg t1c.jpg [--ckpt out] [--draw answer.png]
    python sample.py --data val.jsonl --out pred.jsonl [--ckpt out]
    python sample.py                      # the first validation rows of the demo data that train.py made

One image per modality, in the checkpoint's order. The answer is one JSON line: the box in the training
data's corner order (by default [maxx, maxy, minx, miny]; --box-format xywh gives COCO [x, y, w, h]),
in pixels of the image size it names.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import data
from model import CheckpointError, MiniGPT


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
def predict(model, samples, meta, device, batch_size=32, pad=False):
    """-> the answered box per sample, pixel [x0, y0, x1, y1] of that sample's own image size. Batches of
    batch_size; pad=True fills the last one up (repeating its last sample) so that a compiled decode step
    sees one batch shape only."""
    preds, dtype = [], next(model.parameters()).dtype  # inputs in the weights' dtype (bf16 with --bf16)
    for i in range(0, len(samples), batch_size):
        chunk = samples[i: i + batch_size]
        x = torch.stack([data.load_images(s, meta["image_size"], meta["mean"], meta["std"]) for s in chunk])
        if pad and len(samples) > batch_size and len(chunk) < batch_size:
            x = torch.cat([x, x[-1:].expand(batch_size - len(chunk), *x.shape[1:])])
        boxes = model.answer_boxes(x.to(device, dtype)).float().cpu()[: len(chunk)]  # (b, 4) normalised
        preds += [data.to_pixels(b, s.size) for b, s in zip(boxes, chunk)]
    return preds


def draw(sample, modalities, pred, path):
    """The modalities side by side, the answer in red and the true box (when known) in green."""
    tiles = [Image.open(p).convert("RGB") for p in sample.paths]
    W, H = sample.size
    sheet = Image.new("RGB", (W * len(tiles), H + 16), "black")
    d = ImageDraw.Draw(sheet)
    for k, (tile, name) in enumerate(zip(tiles, modalities)):
        sheet.paste(tile, (k * W, 16))
        d.text((k * W + 2, 2), name, fill="white")
        for box, color in [(b, (0, 220, 0)) for b in sample.boxes] + [(pred, (255, 40, 40))]:
            x0, y0, x1, y1 = box
            d.rectangle([k * W + x0, 16 + y0, k * W + x1, 16 + y1], outline=color, width=2)
    sheet.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message} (see --help)")  # one line, not the whole usage
    p.add_argument("--images", nargs="+", help="one image per modality, in the checkpoint's order (see the error for which)")
    p.add_argument("--data", help="a summary.jsonl: answer every row (batched); scored when its rows carry boxes")
    p.add_argument("--out", help="with --data: write predictions here, one JSON line per input line (default: stdout)")
    p.add_argument("--ckpt", default="out", help="checkpoint folder, or train.py's --out folder (default out/)")
    p.add_argument("--box-format", choices=["corners", "xywh"],
                   help="corners: [maxx, maxy, minx, miny]; xywh: COCO [x, y, w, h] (default: the training data's)")
    p.add_argument("--draw", help="PNG: the modalities side by side with the answered box (red) and the true one (green)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="hold the weights in bf16 for answering (default: on CUDA)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode step, with CUDA graphs on CUDA; pays off over many rows (default: on CUDA with --data)")
    args = p.parse_args(argv)

    ckpt = find_checkpoint(args.ckpt)
    model, meta, tokenizer = load(ckpt)
    cuda = args.device.startswith("cuda")
    model.to(args.device, torch.bfloat16 if (cuda if args.bf16 is None else args.bf16) else torch.float32)
    if (cuda and args.data is not None) if args.compile is None else args.compile:
        model.compile_decode()
        args.compile = True
    modalities = meta["modalities"]
    box_format = args.box_format or meta["box_format"]

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

    preds = predict(model, samples, meta, args.device, pad=bool(args.compile))
    lines = []
    for s, pred in zip(samples, preds):
        row = {} if args.images else {k: v for k, v in s.row.items() if k.endswith("_path")}
        row["box"] = [data.box_to_output(pred, box_format)]
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
    scored = [(p, s) for p, s in zip(preds, samples) if s.boxes]  # rows with a true box ("box": [] has none)
    if scored:
        s = data.score_boxes(*zip(*scored))
        print(f"{data.score_line(s)} on {len(scored)} rows"
              + (f" ({len(samples) - len(scored)} rows without a box not scored)" if len(scored) < len(samples) else ""),
              file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (data.DataError, CheckpointError) as e:  # the user's input: one line, no traceback
        sys.exit(f"error: {e}")

"""
The run-time data contract, between files on disk and tensors: summary.jsonl, images, boxes, the
prompt and answer text, the tokenizer, batches and the patient split. train.py and sample.py read
data through this file; prepare.py makes the summary.jsonl files it reads.

Read top to bottom: the data contract (read_summary), images, boxes as location bins, the tokenizer,
prompt and answer ids, batches and augmentation, the patient split.

This file imports only config.py (for DataError).
"""
import io
import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F
from PIL import Image

from config import DataError  # kept importable as data.DataError

# Normalisation of the CLIP / BLIP-2 (EVA) vision encoders.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_IMAGE_SIDE = 8  # pixels; an image smaller than this on a side is not a scan


# -----------------------------------------------------------------------------
# summary.jsonl

@dataclass
class Sample:
    paths: list[str]  # absolute, in modality order
    boxes: list[list[float]]  # [x0, y0, x1, y1] in original pixels, clipped, x0 < x1, y0 < y1
    size: tuple[int, int]  # (W, H), shared by all modalities
    line: int  # 1-based line in the jsonl file
    row: dict  # the original JSON object (other keys kept for echoing)
    case: str  # patient id, see case_id


def read_summary(path, box_format="corners", require_boxes=True, check_images=True):
    """Read a summary.jsonl -> (modalities, samples). See README, "Your data".

    Modalities and their order come from the first row's `*_path` keys; a later row may list its
    keys in any order but must name the same ones. Each image's header is always read (for its
    size); check_images=True also decodes every image, so a corrupt file stops here, not
    mid-training.
    """
    assert box_format in ("corners", "xywh"), box_format
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:  # e.g. an image or a binary file given as --data
        message = f"{path}: not a text file of JSON lines (not UTF-8 at byte {e.start})"
        raise DataError(message) from None
    modalities, samples = None, []
    for line, text in enumerate(lines, 1):
        if not text.strip():
            continue
        where = f"{path}:{line}"
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        names = [k[: -len("_path")] for k in row if k.endswith("_path")]
        if not names:
            raise DataError(f"{where}: no image keys (keys ending in '_path')")
        if modalities is None:
            modalities = names
        elif sorted(names) != sorted(modalities):
            raise DataError(f"{where}: modalities {names} differ from the first row's {modalities}")
        paths, sizes = [], []
        for m in modalities:
            value = row[m + "_path"]
            if not isinstance(value, str) or not value:
                raise DataError(f"{where}: '{m}_path' must be a file name, got {value!r}")
            p = (path.parent / value).resolve()  # relative to the jsonl's folder, or absolute
            sizes.append(_image_size(p, where, m + "_path", check_images))
            paths.append(str(p))
        if len(set(sizes)) > 1:
            got = ", ".join(f"'{m}_path' {w}x{h}" for m, (w, h) in zip(modalities, sizes))
            raise DataError(f"{where}: images of one row must have one size, got {got}")
        W, H = sizes[0]
        if "box" in row:
            boxes = _parse_boxes(row["box"], box_format, W, H, where)
        elif require_boxes:
            raise DataError(f"{where}: no 'box' key")
        else:
            boxes = []
        case = next((str(row[k]) for k in CASE_KEYS if k in row), None) or case_id(*paths)
        samples.append(Sample(paths, boxes, (W, H), line, row, case))
    if not samples:
        raise DataError(f"{path}: empty file (no JSON rows)")
    return modalities, samples


# A row's "context_slices": C (prepare.py brats --context-slices): its images are RGB pictures of
# slices k - C, k, k + C of a study, not one grey slice. A model trained on them answers only such
# pictures, so the value travels with its checkpoint (train.py) and sample.py checks it.
CONTEXT_KEY = "context_slices"
MAX_CONTEXT = 16


def context_slices(samples, path) -> int:
    """-> the rows' "context_slices" (0 where absent): one whole number in [0, MAX_CONTEXT], the
    same on every row as on the first (the pictures of one model are made one way); else
    DataError naming the line."""
    first = None  # (value, line) of the first row
    for s in samples:
        v = s.row.get(CONTEXT_KEY, 0)
        if type(v) is not int or not 0 <= v <= MAX_CONTEXT:
            raise DataError(f"{path}:{s.line}: \"{CONTEXT_KEY}\" {v!r}: expected a whole number "
                            f"from 0 to {MAX_CONTEXT}")
        first = first or (v, s.line)
        if v != first[0]:
            raise DataError(f"{path}:{s.line}: \"{CONTEXT_KEY}\" {v}, but line {first[1]} says "
                            f"{first[0]}: the images of one dataset must be made one way")
    return first[0] if first else 0


def sample_from_images(paths):
    """The images of one study given on a command line -> a Sample without boxes; errors name the
    file."""
    paths = [Path(p).resolve() for p in paths]
    sizes = [_image_size(p, str(p), "image", True) for p in paths]
    if len(set(sizes)) > 1:
        got = ", ".join(f"{p.name} {w}x{h}" for p, (w, h) in zip(paths, sizes))
        raise DataError(f"images of one study must have one size, got {got}")
    return Sample([str(p) for p in paths], [], sizes[0], 0, {}, case_id(*paths))


def _image_size(p, where, key, decode):
    if not p.is_file():
        raise DataError(f"{where}: '{key}' image not found: {p}")
    try:
        with Image.open(p) as im:
            if decode:
                im.load()  # raises on truncated or corrupt data
            size = im.size
    except Exception as e:  # pillow raises several types for bad files
        raise DataError(f"{where}: '{key}' cannot be read as an image: {p} ({e})") from None
    if decode and min(size) < MIN_IMAGE_SIDE:  # to be read as pixels, not just listed
        raise DataError(f"{where}: '{key}' image of {size[0]}x{size[1]} pixels is too small "
                        f"(at least {MIN_IMAGE_SIDE} per side): {p}")
    return size


def _parse_boxes(value, box_format, W, H, where):
    if isinstance(value, list) and len(value) == 4 and all(_is_number(v) for v in value):
        value = [value]  # a single flat box is read as a list of one
    if not isinstance(value, list):
        raise DataError(f"{where}: 'box' must be a list of boxes, got {value!r}")
    boxes = []
    for b in value:
        if not (isinstance(b, list) and len(b) == 4 and all(_is_number(v) for v in b)):
            raise DataError(f"{where}: 'box' entry {b!r} is not four numbers")
        if not all(math.isfinite(v) for v in b):
            raise DataError(f"{where}: 'box' entry {b!r} is not finite")
        if box_format == "xywh":
            x, y, w, h = b
            x0, y0, x1, y1 = x, y, x + w, y + h
        else:  # two opposite corners in any order, e.g. the blog's [maxx, maxy, minx, miny]
            x0, x1 = sorted((b[0], b[2]))
            y0, y1 = sorted((b[1], b[3]))
        if not (x1 > x0 and y1 > y0):
            raise DataError(f"{where}: 'box' entry {b!r} has zero (or negative) width or height")
        c = [max(0.0, float(x0)), max(0.0, float(y0)),
             min(float(W), float(x1)), min(float(H), float(y1))]
        if not (c[2] > c[0] and c[3] > c[1]):
            raise DataError(f"{where}: 'box' entry {b!r} lies entirely outside the {W}x{H} image")
        boxes.append(c)
    return boxes


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def box_to_output(box_xyxy, box_format):
    """[x0, y0, x1, y1] -> the file's format: corners [maxx, maxy, minx, miny] (the blog's order) or
    [x, y, w, h]. Rounded to 0.1 px, finer than any answer is sure of (a location bin is a few
    pixels); Python ints (the converters' pixel edges) stay ints."""
    x0, y0, x1, y1 = (_round_px(v) for v in box_xyxy)
    if box_format == "corners":
        return [x1, y1, x0, y0]
    return [x0, y0, _round_px(x1 - x0), _round_px(y1 - y0)]


def _round_px(v):
    return v if isinstance(v, int) else round(float(v), 1)  # float(): numpy and torch scalars too


# -----------------------------------------------------------------------------
# images

def open_image(path):
    """An image file -> a decoded pillow image, 16- and 32-bit grey scaled to mode F
    (to_8bit_range); DataError naming the file when it cannot be read."""
    try:
        with Image.open(path) as im:
            im = to_8bit_range(im, path)
            im.load()
            return im
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot be read as an image ({e})") from None


def image_tensor(im, size, window=None, mean=CLIP_MEAN, std=CLIP_STD):
    """A pillow image -> (3, size, size) float32: its window [x0, y0, w, h] (None: the whole
    image) squash-resized (boxes scale with it), normalised. A grayscale slice becomes three equal
    channels, as pretrained ViTs expect RGB."""
    if window is not None:
        x0, y0, w, h = window
        im = im.crop((x0, y0, x0 + w, y0 + h))
    im = im.resize((size, size), Image.BICUBIC)
    if im.mode == "F":  # high bit depth, already in [0, 1]: grey -> three equal channels
        grey = np.clip(np.asarray(im, dtype=np.float32), 0, 1)  # (S, S)
        x = torch.from_numpy(grey)[None].expand(3, -1, -1)
    else:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0  # (S, S, 3)
        x = torch.from_numpy(rgb).permute(2, 0, 1)  # (3, S, S)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def load_image(path, size, mean=CLIP_MEAN, std=CLIP_STD):
    """One image file, whole -> (3, size, size) float32 (image_tensor)."""
    return image_tensor(open_image(path), size, None, mean, std)


# --crop head: each study is read through one square window around the head (or, in skull-stripped
# data, the brain), the same for all its modalities. A BraTS brain spans about half of the slice's
# side, so at 64 px the window doubles the pixels on the tumour, at no cost to the step (the window
# is cut once, when the images are read). The image is averaged over blocks of 1/32 of its side (a
# scanner's background noise averages out, where single noisy pixels would widen the window to the
# whole image); a block is the head's when above CROP_AT of the blocks' 99th percentile (the
# background of a scan, or of a converter's windowed picture, is far below). The window is the
# square around those blocks, centred, with CROP_MARGIN of its side added on each side, then cut at
# the image's edges (a head that fills the image is read whole, and every answer lies in it).
CROP_AT = 0.1
CROP_MARGIN = 0.05
CROPS = ("none", "head")  # config's --crop choices (a test checks they agree)


def head_window(images):
    """A study's pillow images (one size) -> the window [x0, y0, w, h] in pixels: the square around
    what stands out of their background, cut at the image's edges; the whole image [0, 0, W, H]
    when nothing does."""
    W, H = images[0].size
    k = max(1, min(W, H) // 32)  # block side in pixels
    h, w = H // k, W // k  # whole blocks; a sliver of under k pixels at the far edges is left out
    rows, cols = np.zeros(h, bool), np.zeros(w, bool)
    for im in images:
        a = np.asarray(im if im.mode == "F" else im.convert("L"), dtype=np.float32)  # (H, W)
        a = a[:h * k, :w * k].reshape(h, k, w, k).mean((1, 3))  # (h, w) block means
        top = float(np.percentile(a, 99))
        if top > 0:
            head = a > CROP_AT * top
            rows |= head.any(1)
            cols |= head.any(0)
    if not rows.any():
        return [0, 0, W, H]
    (y0, y1), (x0, x1) = np.nonzero(rows)[0][[0, -1]], np.nonzero(cols)[0][[0, -1]]
    x0, y0, x1, y1 = x0 * k, y0 * k, x1 * k + k - 1, y1 * k + k - 1  # blocks -> pixels
    side = int(round(max(x1 + 1 - x0, y1 + 1 - y0) * (1 + 2 * CROP_MARGIN))) + 2
    side = max(side, MIN_IMAGE_SIDE)
    left, top = int(round((x0 + x1 + 1 - side) / 2)), int(round((y0 + y1 + 1 - side) / 2))
    left, top, right, bottom = max(left, 0), max(top, 0), min(left + side, W), min(top + side, H)
    return [left, top, right - left, bottom - top]


def to_8bit_range(im, path):
    """8-bit images (grey, RGB, palette, RGBA, CMYK) as they are, for pillow's RGB conversion; 16-
    and 32-bit grey (modes I;16, I, F: how MRI slices are often exported) -> mode F scaled by the
    image's own range, min -> 0 and max -> 1. Pillow's RGB conversion would clip those at 255 (a
    nearly white picture); scaled, a picture saved in 16 bits reads like the same picture in 8 bits.
    A tiny or empty image is a DataError."""
    W, H = im.size
    if min(W, H) < MIN_IMAGE_SIDE:
        raise DataError(f"{path}: image of {W}x{H} pixels is too small "
                        f"(at least {MIN_IMAGE_SIDE} per side)")
    if im.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return im
    a = np.asarray(im, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    scaled = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return Image.fromarray(scaled.astype(np.float32), mode="F")


def load_images(sample, size, mean=CLIP_MEAN, std=CLIP_STD, crop="none"):
    """A sample's images -> (images (N, 3, S, S), window [x0, y0, w, h]): the part of its images
    they show, in pixels (crop "head": head_window; "none": the whole image). A box the model
    answers is normalised to that window (to_pixels)."""
    ims = [open_image(p) for p in sample.paths]
    return read_window(ims, size, mean, std, crop)


def read_window(ims, size, mean=CLIP_MEAN, std=CLIP_STD, crop="none"):
    """One study's pillow images -> (images (N, 3, S, S), window): load_images after the reading."""
    window = head_window(ims) if crop == "head" else [0, 0, *ims[0].size]
    return torch.stack([image_tensor(im, size, window, mean, std) for im in ims]), window


# The second look (--second-look): the answered box is answered again through a square window around
# it, ZOOM_CONTEXT times its longer side (at least ZOOM_MIN of the image's shorter side), so that a
# tumour of 8 of the 64 pixels is read at about 32. Training adds, for every row with a box, one
# such view around its largest box, its size and centre jittered as a first answer is off
# (ZOOM_JITTER: size x / 1.25 at most, centre by 0.15 of the side at most, which keeps the box
# inside: half of it spans at most 0.25 of the side). The window may reach past the image's edges,
# read as black, so that the box's surroundings keep one scale.
ZOOM_CONTEXT = 2.0
ZOOM_MIN = 0.25
ZOOM_JITTER = (1.25, 0.15)


def zoom_window(box, W, H, rng=None):
    """A pixel box [x0, y0, x1, y1] in a W x H image -> the square window [x0, y0, w, h] around
    it; rng (a random.Random): jittered, for training."""
    x0, y0, x1, y1 = box
    side = max(ZOOM_CONTEXT * max(x1 - x0, y1 - y0), ZOOM_MIN * min(W, H))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if rng is not None:
        scale, shift = ZOOM_JITTER
        side *= math.exp(rng.uniform(-math.log(scale), math.log(scale)))
        cx += rng.uniform(-shift, shift) * side
        cy += rng.uniform(-shift, shift) * side
    side = max(int(round(side)), MIN_IMAGE_SIDE)
    return [int(round(cx - side / 2)), int(round(cy - side / 2)), side, side]


def load_zoomed(sample, box, size, mean=CLIP_MEAN, std=CLIP_STD, rng=None):
    """A sample's images read through zoom_window around a pixel box -> (images (N, 3, S, S),
    window [x0, y0, w, h]); an answer in that window maps back with to_pixels."""
    ims = [open_image(p) for p in sample.paths]
    window = zoom_window(box, *ims[0].size, rng)
    return torch.stack([image_tensor(im, size, window, mean, std) for im in ims]), window


def zoom_tensors(samples, image_size, max_boxes, seed, mean=CLIP_MEAN, std=CLIP_STD):
    """The second look's training rows: every sample with a box, read through a jittered
    zoom_window around its largest box -> images (M, N, 3, S, S) float16, boxes (M, K, 4)
    normalised to the window (only the largest: the look answers one box), nbox (M,), as
    load_tensors. rng from seed: a resumed run reads the same views."""
    rng = random.Random(seed)
    images, boxes = [], []
    for s in samples:
        if not s.boxes:
            continue
        big = max(s.boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        x, window = load_zoomed(s, big, image_size, mean, std, rng)
        images.append(x.half())
        b = torch.zeros(max_boxes, 4)
        b[0] = torch.tensor(to_window(big, window))
        boxes.append(b)
    if not images:  # no row with a box: no second look to learn
        return None
    return torch.stack(images), torch.stack(boxes), torch.ones(len(images), dtype=torch.long)


# -----------------------------------------------------------------------------
# boxes as location bins (Pix2Seq / PaliGemma style): each coordinate is quantised into `bins` bins
# of the image's own width or height, so the answer does not depend on the image size or the resize.

def box_to_bins(box_xyxy, W, H, bins):
    """Pixel box -> [bx0, by0, bx1, by1], each in [0, bins - 1]. The readable one-box twin of the
    batched quantisation in answer_tokens (training uses that one; the tests hold the two equal)."""
    x0, y0, x1, y1 = box_xyxy
    q = lambda v, n: min(max(int(math.floor(v / n * bins)), 0), bins - 1)
    return [q(x0, W), q(y0, H), q(x1, W), q(y1, H)]


def to_pixels(box, window):
    """Normalised [x0, y0, x1, y1] (a list or a tensor) -> pixel box of the image whose window
    [x0, y0, w, h] the model read (the whole image: [0, 0, W, H])."""
    ox, oy, W, H = window
    x0, y0, x1, y1 = (float(v) for v in box)
    return [ox + x0 * W, oy + y0 * H, ox + x1 * W, oy + y1 * H]


def to_window(box, window):
    """to_pixels' inverse: pixel [x0, y0, x1, y1] -> normalised to the window, clamped to [0, 1]
    (a box reaching past a head window keeps its part inside it)."""
    ox, oy, W, H = window
    x0, y0, x1, y1 = box
    return [min(max(v, 0.0), 1.0) for v in ((x0 - ox) / W, (y0 - oy) / H, (x1 - ox) / W,
                                            (y1 - oy) / H)]


def bins_to_box(b, W, H, bins):
    """Bins -> pixel box at the bin centres (MiniGPT.answer_boxes_once does the same, batched and
    normalised). Worst-case error per coordinate: W / (2 * bins) in x, H / (2 * bins) in y (a
    coordinate anywhere in a bin is at most half a bin from its centre)."""
    x0, x1 = sorted(((b[0] + 0.5) / bins * W, (b[2] + 0.5) / bins * W))
    y0, y1 = sorted(((b[1] + 0.5) / bins * H, (b[3] + 0.5) / bins * H))
    return [x0, y0, x1, y1]


def box_iou(a, b):
    """Intersection over union of two [x0, y0, x1, y1] boxes (0 when either is empty)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score_boxes(preds, samples):
    """One answer per sample, a box or None ("no tumour") -> mean IoU and accuracy at IoU >= 0.5 and
    >= 0.75 over the samples with a true box (each answer scored against its best-matching true box,
    a "no tumour" answer there scores 0); and, as "sens" and "spec", slice-level presence: the share
    of samples with a true box answered with a box (sensitivity) and, when some samples have none,
    the share of those answered "no tumour" (specificity)."""
    pos = [(p, s) for p, s in zip(preds, samples) if s.boxes]
    neg = [p for p, s in zip(preds, samples) if not s.boxes]
    ious = [max(box_iou(p, t) for t in s.boxes) if p is not None else 0.0 for p, s in pos]
    n = max(len(ious), 1)
    out = dict(miou=sum(ious) / n, acc50=sum(i >= 0.5 for i in ious) / n,
               acc75=sum(i >= 0.75 for i in ious) / n, sens=sum(p is not None for p, _ in pos) / n)
    if neg:
        out["spec"] = sum(p is None for p in neg) / len(neg)
    return out


def score_line(s):
    """score_boxes' dict -> the line train.py and sample.py print,
    'mean IoU 0.612, acc@0.5 0.780, acc@0.75 0.310, presence sens 0.950 spec 0.930'
    (the presence part only when some rows have no true box)."""
    line = f"mean IoU {s['miou']:.3f}, acc@0.5 {s['acc50']:.3f}, acc@0.75 {s['acc75']:.3f}"
    return line + (f", presence sens {s['sens']:.3f} spec {s['spec']:.3f}" if "spec" in s else "")


# -----------------------------------------------------------------------------
# tokenizer

def special_tokens(num_bins, max_images=8):
    """Our special tokens, in id order: <box> </box>, the image tags, then the location tokens."""
    imgs = [t for i in range(1, max_images + 1) for t in (f"<Img{i}>", f"</Img{i}>")]
    return ["<box>", "</box>"] + imgs + [f"<loc_{k}>" for k in range(num_bins)]


def _tokenizer_corpus():
    """A small fixed text the from-scratch tokenizer learns its pieces from: the prompt in every
    template, phrasing variants a user may type, and numbers. Fixed: training is deterministic."""
    questions = ["where is the tumor?", "Where is the tumor?", "where is the tumour?",
                 "Where is the lesion?", "Find the tumor in these MRI slices.",
                 "Give the bounding box of the tumor.", "Is there a tumor in this brain MRI slice?",
                 "Locate the enhancing tumor and the edema."]
    words = ("brain MRI axial coronal sagittal slice FLAIR T1 T2 contrast image images box tumor "
             "tumour glioma edema oedema necrosis enhancing core whole left right upper lower "
             "the a an in of on at is are this these there where which what patient case scan "
             "modality").split()
    lines = []
    for q in questions:
        lines += [q, f"###Human: {q} ###Assistant: ", f"[INST] {q} [/INST] ", f"</Img1> {q} <box>"]
    for i in range(len(words)):  # deterministic word salad so every word also appears in context
        lines.append(" ".join(words[(i * k) % len(words)] for k in range(1, 12)))
    lines += [" ".join(str((i * 37 + k) % 1000) for k in range(10)) for i in range(20)]
    return lines * 4


class Tokenizer:
    """A sentencepiece model plus our special tokens (each one id, never split).

    Two ways in: `Tokenizer.train(path)` trains a small model from scratch whose
    user_defined_symbols are our specials; `Tokenizer(path)` on a pretrained LLaMA tokenizer.model
    (which lacks them) appends them after its vocabulary (ids sp.get_piece_size() + i), and the
    LLM's embedding grows to match. Either way encode() cuts the text at special tokens and encodes
    the pieces between them separately, so both kinds of model tokenize our prompts the same way.
    pad_id: the model's pad piece if it has one (our trained models do), else eos_id (LLaMA has no
    pad); padding is never a target (the answer mask is False there), so any valid id would do.
    """

    def __init__(self, model_path, num_bins=64, max_images=8):
        self.model_path, self.num_bins, self.max_images = str(model_path), num_bins, max_images
        if not Path(model_path).is_file():
            raise DataError(f"{model_path}: tokenizer model not found")
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        n = self.sp.get_piece_size()
        specials = special_tokens(num_bins, max_images)
        present = [self.sp.piece_to_id(t) for t in specials]
        present = [i if self.sp.id_to_piece(i) == t else None for i, t in zip(present, specials)]
        if all(i is not None for i in present):  # trained by us: specials are pieces already
            ids = present
        elif all(i is None for i in present):  # a pretrained vocabulary: append
            ids = list(range(n, n + len(specials)))
        else:
            missing = [t for i, t in zip(present, specials) if i is None]
            raise DataError(
                f"{model_path}: has some of our special tokens but not {missing[:3]}... (trained "
                f"with other num_bins/max_images than {num_bins}/{max_images}?)")
        self.special_ids = dict(zip(specials, ids))
        self.special_tokens = {i: t for t, i in self.special_ids.items()}
        self.vocab_size = max(n, max(ids) + 1)
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        assert self.bos_id >= 0 and self.eos_id >= 0, "the sentencepiece model needs BOS and EOS"
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.box_id, self.box_end_id = self.special_ids["<box>"], self.special_ids["</box>"]
        self.loc_start = self.special_ids["<loc_0>"]
        assert all(self.special_ids[f"<loc_{k}>"] == self.loc_start + k for k in range(num_bins))
        self._split = re.compile("(" + "|".join(re.escape(t) for t in specials) + ")")

    @classmethod
    def train(cls, model_path, num_bins=64, max_images=8):
        """Train a small BPE model from scratch, deterministically (fixed corpus, one thread, no
        sampling), with byte fallback (any text encodes), digits split, specials single pieces."""
        specials = special_tokens(num_bins, max_images)
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_tokenizer_corpus()), model_writer=model, model_type="bpe",
            vocab_size=4 + len(specials) + 256 + 160,  # 4 = unk bos eos pad; 256 bytes
            hard_vocab_limit=False, user_defined_symbols=specials, byte_fallback=True,
            split_digits=True, character_coverage=1.0,
            # like LLaMA: text round-trips
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, shuffle_input_sentence=False,
            input_sentence_size=0, minloglevel=2)
        Path(model_path).parent.mkdir(parents=True, exist_ok=True)
        Path(model_path).write_bytes(model.getvalue())
        return cls(model_path, num_bins, max_images)

    def encode(self, text):
        """Text -> ids, no BOS/EOS. Special tokens in the text become their single ids."""
        ids = []
        for part in self._split.split(text):
            if part in self.special_ids:
                ids.append(self.special_ids[part])
            elif part:
                ids += self.sp.encode(part)
        return ids

    def decode(self, ids):
        out, run = [], []
        for i in list(ids) + [None]:
            if i is None or i in self.special_tokens:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if i is not None:
                    out.append(self.special_tokens[i])
            else:
                run.append(int(i))
        return "".join(out)


# -----------------------------------------------------------------------------
# prompt and answer

QUESTION = "where is the tumor?"
# The question part only; "<box>" follows the template so that it directly precedes the answer.
TEMPLATES = {"plain": "{prompt}", "vicuna": "###Human: {prompt} ###Assistant: ",
             "llama2": "[INST] {prompt} [/INST] "}


def prompt_text(n_slots, template="plain"):
    """The prompt in the template:
    <Img1><ImageHere></Img1>...<ImgN><ImageHere></ImgN> where is the tumor? <box>"""
    images = "".join(f"<Img{i}><ImageHere></Img{i}>" for i in range(1, n_slots + 1))
    text = TEMPLATES[template].format(prompt=images + " " + QUESTION)
    return text + ("" if text.endswith(" ") else " ") + "<box>"


def prompt_chunks(tokenizer, n_slots, template="plain"):
    """The prompt cut at <ImageHere> into n_slots + 1 chunks of ids, each encoded separately, so
    image embeddings go exactly between them. Chunk 0 starts with BOS, the last ends with <box>."""
    if template not in TEMPLATES:
        raise DataError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
    if not 1 <= n_slots <= tokenizer.max_images:
        raise DataError(f"{n_slots} image slots, but the tokenizer has image tags for "
                        f"1..{tokenizer.max_images}")
    parts = prompt_text(n_slots, template).split("<ImageHere>")
    chunks = [tokenizer.encode(p) for p in parts]
    chunks[0] = [tokenizer.bos_id] + chunks[0]
    assert len(chunks) == n_slots + 1 and chunks[-1][-1] == tokenizer.box_id
    return chunks


def answer_ids(tokenizer, boxes_bins):
    """Boxes as bins -> [loc, loc, loc, loc] * k + [</box>, EOS]: the readable one-sample twin of
    answer_tokens (training uses that one; the tests hold the two equal)."""
    ids = []
    for b in boxes_bins:
        assert len(b) == 4 and all(0 <= v < tokenizer.num_bins for v in b), b
        ids += [tokenizer.loc_start + int(v) for v in b]
    return ids + [tokenizer.box_end_id, tokenizer.eos_id]


def parse_answer(tokenizer, ids):
    """Answer ids -> groups of 4 bins, to read an answer by hand (generate returns bins directly).
    Stops at </box> or EOS; other tokens are skipped; a trailing partial group is dropped."""
    bins = []
    for i in ids:
        i = int(i)
        if i in (tokenizer.box_end_id, tokenizer.eos_id):
            break
        if tokenizer.loc_start <= i < tokenizer.loc_start + tokenizer.num_bins:
            bins.append(i - tokenizer.loc_start)
    return [bins[k:k + 4] for k in range(0, len(bins) - 3, 4)]


# -----------------------------------------------------------------------------
# batches

def load_tensors(samples, image_size, max_boxes, mean=CLIP_MEAN, std=CLIP_STD, crop="none"):
    """Read every image once -> images (M, N, 3, S, S) float16 (half the memory; exact enough for
    pixels normalised to a few units), boxes (M, K, 4) [x0, y0, x1, y1] normalised to each row's
    window with K = max_boxes, largest first (a row with more boxes keeps the largest), nbox (M,)
    the real boxes per row, and the windows (load_images), one [x0, y0, w, h] per row. A batch is
    then an index into these tensors, and its answer tokens are made by answer_tokens after
    augmentation."""
    images, windows = [], []
    for s in samples:
        x, window = load_images(s, image_size, mean, std, crop)
        images.append(x.half())
        windows.append(window)
    boxes = torch.zeros(len(samples), max_boxes, 4)
    nbox = torch.zeros(len(samples), dtype=torch.long)
    for i, s in enumerate(samples):
        area = lambda b: (b[2] - b[0]) * (b[3] - b[1])
        kept = sorted(s.boxes, key=area, reverse=True)[:max_boxes]
        for j, box in enumerate(kept):
            boxes[i, j] = torch.tensor(to_window(box, windows[i]))
        nbox[i] = len(kept)
    return torch.stack(images), boxes, nbox, windows


def answer_tokens(boxes, nbox, num_bins, loc_start, box_end_id, eos_id, pad_id):
    """The batched, on-device answer_ids: boxes (B, K, 4) normalised, nbox (B,) ->
    answer (B, 4K + 2) = locations of the first nbox boxes, </box>, EOS, then pad_id; and
    answer_mask (B, 4K + 2), True on the real answer tokens. Fixed shapes, for one graph."""
    B, K, _ = boxes.shape
    bins = (boxes * num_bins).floor().clamp(0, num_bins - 1).long()
    j = torch.arange(4 * K + 2, device=boxes.device).expand(B, -1)  # (B, L) position in the answer
    n = 4 * nbox.view(B, 1)  # where </box> goes
    locs = torch.cat([loc_start + bins.view(B, 4 * K), torch.zeros_like(j[:, :2])], 1)  # (B, L)
    end = torch.where(j == n, box_end_id, torch.where(j == n + 1, eos_id, pad_id))  # </box>, EOS
    answer = torch.where(j < n, locs, end)
    return answer, j <= n + 1


@dataclass
class Augment:
    """Random augmentation of a batch that moves the boxes with the pixels. Each study gets one
    geometric transform shared by its modalities (they are co-registered) and an intensity jitter
    per modality. All randomness comes from `generator`, so a resumed run sees the same batches."""
    flip: float = 0.5          # chance of a left-right mirror: tumours occur in both hemispheres
    scale: float = 0.1         # zoom drawn from [1 - scale, 1 + scale]
    translate: float = 0.1     # shift, as a share of the image side
    rotate: float = 5.0        # degrees in [-rotate, rotate]; the new box encloses the rotated one
    contrast: float = 0.2      # per-modality gain in [1 - contrast, 1 + contrast]
    brightness: float = 0.2    # per-modality offset, in normalised units
    noise: float = 0.05        # std of added Gaussian noise, in normalised units

    def scaled(self, k: float) -> "Augment":
        """Every range times k (the flip probability stays)."""
        ranges = ("scale", "translate", "rotate", "contrast", "brightness", "noise")
        return Augment(self.flip, *(k * getattr(self, f) for f in ranges))

    def __call__(self, images, boxes, generator=None):
        """images (B, N, C, S, S), boxes (B, K, 4) normalised -> both transformed, same shapes."""
        B, N, C, S, _ = images.shape
        rand = lambda *shape: torch.rand(*shape, generator=generator).to(images.device)
        # F.affine_grid's convention: output point u (in [-1, 1]) samples the input at A @ u + t.
        angle = (rand(B) * 2 - 1) * math.radians(self.rotate)
        zoom = 1 + (rand(B) * 2 - 1) * self.scale
        mirror = torch.where(rand(B) < self.flip, -1.0, 1.0)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        rows = [torch.stack([cos * mirror, -sin], -1), torch.stack([sin * mirror, cos], -1)]
        A = torch.stack(rows, -2)  # (B, 2, 2)
        t = (rand(B, 2) * 2 - 1) * 2 * self.translate  # (B, 2)
        theta = torch.cat([A, t[:, :, None]], 2)  # (B, 2, 3)
        grid = F.affine_grid(theta, (B, N * C, S, S), align_corners=False)
        x = F.grid_sample(images.reshape(B, N * C, S, S).float(), grid, mode="bilinear",
                          padding_mode="border", align_corners=False).view(B, N, C, S, S)
        gain = 1 + (rand(B, N, 1, 1, 1) * 2 - 1) * self.contrast
        offset = (rand(B, N, 1, 1, 1) * 2 - 1) * self.brightness
        x = x * gain + offset + torch.randn(x.shape, generator=generator).to(x.device) * self.noise
        # Boxes: an input corner p maps to the output point u = A^-1 (p - t); the new box encloses
        # the four corners.
        p = boxes * 2 - 1  # (B, K, 4)
        corners = torch.stack([p[..., [0, 2, 0, 2]], p[..., [1, 1, 3, 3]]], -1)  # (B, K, 4, 2)
        u = torch.einsum("bij,bkcj->bkci", torch.linalg.inv(A), corners - t[:, None, None, :])
        return x, ((torch.cat([u.amin(-2), u.amax(-2)], -1) + 1) / 2).clamp(0, 1)


def batch_indices(step, batch_size, n, seed, rank=0, world=1):
    """The sample indices (batch_size,) of one process at one step. All processes together walk one
    stream of samples, epoch after epoch, each epoch a permutation of the n samples drawn from
    (seed, epoch); at each step process `rank` takes its own batch_size of them. A fixed function of
    the step, so a resumed run sees the same data."""
    first = (step * world + rank) * batch_size  # this process's place in the stream of all samples
    pos = torch.arange(first, first + batch_size)
    epoch, k = pos.div(n, rounding_mode="floor"), pos % n
    perms = {e: torch.randperm(n, generator=torch.Generator().manual_seed(seed * EPOCH_STRIDE + e))
             for e in epoch.unique().tolist()}
    return torch.stack([perms[e][i] for e, i in zip(epoch.tolist(), k.tolist())])


# Seeds derived from the run's seed: far apart, so that no two (seed, epoch) or (seed, step) pairs
# of realistic runs share one.
EPOCH_STRIDE = 100_003
STEP_STRIDE = 1_000_003


def step_generator(seed, step, rank=0, world=1):
    """The random stream of one process at one step (augmentation draws from it): different for
    every step and process, the same whenever the step is run again (resume)."""
    return torch.Generator().manual_seed((seed * STEP_STRIDE + step) * world + rank)


# -----------------------------------------------------------------------------
# patients: adjacent slices of one brain nearly repeat each other: split by patient, never by slice

_CASE = re.compile(r"^(.+)_\d+(?:-\d+)?_\d+$")
# a row key naming the patient, which wins over its file names
CASE_KEYS = ("case", "patient", "patient_id", "subject")


def case_id(*paths):
    """The patient of a row without a case key (CASE_KEYS; prepare.py's converters always write
    one), from its image names. The blog's names and ours match _CASE:
    'BraTS-GLI-00000-000_2_0.jpg' -> 'BraTS-GLI-00000-000',
    'BraTS2015-pat0001_1_0-077_3.jpg' -> 'BraTS2015-pat0001_1'. Other names: what the row's images
    share before their modality part, less a trailing slice number
    ('TCGA_CS_4941_19960909_12_flair.png' + '..._12_t1c.png' -> 'TCGA_CS_4941_19960909'); when
    nothing is left (names like '12_flair.png'), the folder name."""
    stems = [Path(p).stem for p in paths]
    m = _CASE.match(stems[0])
    if m:
        return m.group(1)
    name = os.path.commonprefix(stems)
    if len(set(stems)) > 1:  # cut a shared start of the modality names ('_t' of '_t1c' and '_t2f')
        name = name[: max(name.rfind(c) for c in "_-. ") + 1]
    name = re.sub(r"[_\-. ]*\d+[_\-. ]*$", "", name).rstrip("_-. ")
    return name or Path(paths[0]).parent.name or stems[0]


def val_cases(cases, val_fraction, seed):
    cases = sorted(set(cases))
    random.Random(seed).shuffle(cases)
    n = round(len(cases) * val_fraction)
    if val_fraction > 0 and len(cases) > 1:
        n = min(max(n, 1), len(cases) - 1)  # at least one case on each side
    return set(cases[:n])


def split_by_patient(samples, val_fraction=0.1, seed=0):
    """-> (train, val) samples, each in the input order; every case goes wholly to one side."""
    val = val_cases([s.case for s in samples], val_fraction, seed)
    return [s for s in samples if s.case not in val], [s for s in samples if s.case in val]

"""
Everything between files on disk and tensors: summary.jsonl, images, boxes, the prompt and answer
text, the tokenizer, batches, a synthetic demo dataset and a BraTS NIfTI converter.

Read top to bottom: the data contract (read_summary), images, boxes as location bins, the tokenizer,
prompt and answer ids, batches and augmentation, the patient split, then the two dataset makers and the command line:

    python data.py demo OUT_DIR [--cases K] [--seed S]
    python data.py brats SRC_DIR OUT_DIR [--views axial,coronal] [--min-tumor-px N]

This file imports no other project file.
"""
import argparse
import gzip
import io
import json
import math
import os
import random
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

# Normalisation of the CLIP / BLIP-2 (EVA) vision encoders.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# BraTS 2023 names: FLAIR, T2, native T1, post-contrast T1. The index is the last number in file names.
MODALITIES = ("t2f", "t2w", "t1n", "t1c")
VIEWS = ("axial", "coronal", "sagittal")  # the index is the middle number in file names


class DataError(ValueError):
    """A problem with the user's data; the message starts with "FILE:LINE: " when a line applies."""


# -----------------------------------------------------------------------------
# summary.jsonl

@dataclass
class Sample:
    paths: list[str]  # absolute, in modality order
    boxes: list[list[float]]  # [x0, y0, x1, y1] in pixels of the original image, clipped, x0 < x1, y0 < y1
    size: tuple[int, int]  # (W, H), shared by all modalities
    line: int  # 1-based line in the jsonl file
    row: dict  # the original JSON object (other keys kept for echoing)
    case: str  # patient id, see case_id


def read_summary(path, box_format="corners", require_boxes=True, check_images=True):
    """Read a summary.jsonl -> (modalities, samples). See DESIGN.md, "Data contract".

    Modalities and their order come from the first row's `*_path` keys; a later row may list its keys in
    any order but must name the same ones. Each image's header is always read (for its size);
    check_images=True also decodes every image, so a corrupt file stops here and not mid-training.
    """
    assert box_format in ("corners", "xywh"), box_format
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    modalities, samples = None, []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        where = f"{path}:{line}"
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        keys = [k for k in row if k.endswith("_path")]
        if not keys:
            raise DataError(f"{where}: no image keys (keys ending in '_path')")
        if modalities is None:
            modalities = [k[: -len("_path")] for k in keys]
        elif sorted(k[: -len("_path")] for k in keys) != sorted(modalities):
            raise DataError(f"{where}: modalities {[k[:-5] for k in keys]} differ from the first row's {modalities}")
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


def sample_from_images(paths):
    """The images of one study given on a command line -> a Sample without boxes (errors name the file)."""
    paths = [Path(p).resolve() for p in paths]
    sizes = [_image_size(p, str(p), "image", True) for p in paths]
    if len(set(sizes)) > 1:
        raise DataError("images of one study must have one size, got " + ", ".join(f"{p.name} {w}x{h}" for p, (w, h) in zip(paths, sizes)))
    return Sample([str(p) for p in paths], [], sizes[0], 0, {}, case_id(*paths))


def _image_size(p, where, key, decode):
    if not p.is_file():
        raise DataError(f"{where}: '{key}' image not found: {p}")
    try:
        with Image.open(p) as im:
            if decode:
                im.load()  # raises on truncated or corrupt data
            return im.size
    except Exception as e:  # pillow raises several types for bad files
        raise DataError(f"{where}: '{key}' cannot be read as an image: {p} ({e})") from None


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
        c = [max(0.0, float(x0)), max(0.0, float(y0)), min(float(W), float(x1)), min(float(H), float(y1))]
        if not (c[2] > c[0] and c[3] > c[1]):
            raise DataError(f"{where}: 'box' entry {b!r} lies entirely outside the {W}x{H} image")
        boxes.append(c)
    return boxes


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def box_to_output(box_xyxy, box_format):
    """[x0, y0, x1, y1] -> the file's format: corners [maxx, maxy, minx, miny] (the blog's order) or [x, y, w, h]."""
    x0, y0, x1, y1 = box_xyxy
    return [x1, y1, x0, y0] if box_format == "corners" else [x0, y0, x1 - x0, y1 - y0]


# -----------------------------------------------------------------------------
# images

def load_image(path, size, mean=CLIP_MEAN, std=CLIP_STD):
    """One image -> (3, size, size) float32, squash-resized (boxes scale with it), normalised.
    A grayscale slice becomes three equal channels, as pretrained ViTs expect RGB."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BICUBIC)
    except Exception as e:
        raise DataError(f"{path}: cannot be read as an image ({e})") from None
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def load_images(sample, size, mean=CLIP_MEAN, std=CLIP_STD):
    return torch.stack([load_image(p, size, mean, std) for p in sample.paths])  # (N, 3, S, S)


# -----------------------------------------------------------------------------
# boxes as location bins (Pix2Seq / PaliGemma style): each coordinate is quantised into `bins` bins of
# the image's own width or height, so the answer does not depend on the image size or the resize.

def box_to_bins(box_xyxy, W, H, bins):
    """Pixel box -> [bx0, by0, bx1, by1], each in [0, bins - 1]."""
    x0, y0, x1, y1 = box_xyxy
    q = lambda v, n: min(max(int(math.floor(v / n * bins)), 0), bins - 1)
    return [q(x0, W), q(y0, H), q(x1, W), q(y1, H)]


def to_pixels(box, size):
    """Normalised [x0, y0, x1, y1] (a list or a tensor) -> pixel box of an image of size (W, H)."""
    W, H = size
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0 * W, y0 * H, x1 * W, y1 * H]


def bins_to_box(b, W, H, bins):
    """Bins -> pixel box at the bin centres. Worst-case error per coordinate: W / (2 * bins) in x,
    H / (2 * bins) in y (a coordinate anywhere in a bin is at most half a bin from its centre)."""
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
    """One predicted box per sample, each scored against its best-matching true box ->
    mean IoU and accuracy at IoU >= 0.5 and >= 0.75."""
    ious = [max(box_iou(p, t) for t in s.boxes) for p, s in zip(preds, samples)]
    n = max(len(ious), 1)
    return dict(miou=sum(ious) / n, acc50=sum(i >= 0.5 for i in ious) / n, acc75=sum(i >= 0.75 for i in ious) / n)


# -----------------------------------------------------------------------------
# tokenizer

def special_tokens(num_bins, max_images=8):
    """Our special tokens, in id order: <box> </box>, the image tags, then the location tokens."""
    imgs = [t for i in range(1, max_images + 1) for t in (f"<Img{i}>", f"</Img{i}>")]
    return ["<box>", "</box>"] + imgs + [f"<loc_{k}>" for k in range(num_bins)]


def _tokenizer_corpus():
    """A small fixed text the from-scratch tokenizer learns its pieces from: the prompt in every
    template, phrasing variants a user may type, and numbers. Fixed, so training is deterministic."""
    questions = ["where is the tumor?", "Where is the tumor?", "where is the tumour?", "Where is the lesion?",
                 "Find the tumor in these MRI slices.", "Give the bounding box of the tumor.",
                 "Is there a tumor in this brain MRI slice?", "Locate the enhancing tumor and the edema."]
    words = ("brain MRI axial coronal sagittal slice FLAIR T1 T2 contrast image images box tumor tumour "
             "glioma edema oedema necrosis enhancing core whole left right upper lower the a an in of on at "
             "is are this these there where which what patient case scan modality").split()
    lines = []
    for q in questions:
        lines += [q, f"###Human: {q} ###Assistant: ", f"[INST] {q} [/INST] ", f"</Img1> {q} <box>"]
    for i in range(len(words)):  # deterministic word salad so every word also appears in context
        lines.append(" ".join(words[(i * k) % len(words)] for k in range(1, 12)))
    lines += [" ".join(str((i * 37 + k) % 1000) for k in range(10)) for i in range(20)]
    return lines * 4


class Tokenizer:
    """A sentencepiece model plus our special tokens (each one id, never split).

    Two ways in: `Tokenizer.train(path)` trains a small model from scratch whose user_defined_symbols
    are our specials; `Tokenizer(path)` on a pretrained LLaMA tokenizer.model (which lacks them)
    appends them after its vocabulary (ids sp.get_piece_size() + i), and the LLM's embedding grows to
    match. Either way encode() cuts the text at special tokens and encodes the pieces between them
    separately, so both kinds of model tokenize our prompts the same way.
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
            raise DataError(f"{model_path}: has some of our special tokens but not {missing[:3]}... "
                            f"(trained with other num_bins/max_images than {num_bins}/{max_images}?)")
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
        """Train a small BPE model from scratch (deterministic: fixed corpus, one thread, no sampling)
        with byte fallback (any text encodes), digits split, and our specials as single pieces."""
        specials = special_tokens(num_bins, max_images)
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_tokenizer_corpus()), model_writer=model, model_type="bpe",
            vocab_size=4 + len(specials) + 256 + 160, hard_vocab_limit=False,  # 4 = unk bos eos pad; 256 bytes
            user_defined_symbols=specials, byte_fallback=True, split_digits=True, character_coverage=1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False,  # like LLaMA: text round-trips
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
TEMPLATES = {"plain": "{prompt}", "vicuna": "###Human: {prompt} ###Assistant: ", "llama2": "[INST] {prompt} [/INST] "}


def prompt_text(n_slots, template="plain"):
    """<Img1><ImageHere></Img1>...<ImgN><ImageHere></ImgN> where is the tumor? <box>, in the template."""
    question = "".join(f"<Img{i}><ImageHere></Img{i}>" for i in range(1, n_slots + 1)) + " " + QUESTION
    text = TEMPLATES[template].format(prompt=question)
    return text + ("" if text.endswith(" ") else " ") + "<box>"


def prompt_chunks(tokenizer, n_slots, template="plain"):
    """The prompt cut at <ImageHere> into n_slots + 1 chunks of ids, each encoded separately, so image
    embeddings go exactly between them. Chunk 0 starts with BOS; the last chunk ends with <box>."""
    if template not in TEMPLATES:
        raise DataError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
    if not 1 <= n_slots <= tokenizer.max_images:
        raise DataError(f"{n_slots} image slots, but the tokenizer has image tags for 1..{tokenizer.max_images}")
    parts = prompt_text(n_slots, template).split("<ImageHere>")
    chunks = [tokenizer.encode(p) for p in parts]
    chunks[0] = [tokenizer.bos_id] + chunks[0]
    assert len(chunks) == n_slots + 1 and chunks[-1][-1] == tokenizer.box_id
    return chunks


def answer_ids(tokenizer, boxes_bins):
    """Boxes as bins -> [loc, loc, loc, loc] * k + [</box>, EOS]."""
    ids = []
    for b in boxes_bins:
        assert len(b) == 4 and all(0 <= v < tokenizer.num_bins for v in b), b
        ids += [tokenizer.loc_start + int(v) for v in b]
    return ids + [tokenizer.box_end_id, tokenizer.eos_id]


def parse_answer(tokenizer, ids):
    """Answer ids -> groups of 4 bins. Stops at </box> or EOS; other tokens are skipped; a trailing
    partial group is dropped."""
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

def load_tensors(samples, image_size, max_boxes, mean=CLIP_MEAN, std=CLIP_STD):
    """Read every image once -> images (M, N, 3, S, S) float16 (half the memory; exact enough for pixels
    normalised to a few units), boxes (M, K, 4) normalised [x0, y0, x1, y1] with K = max_boxes, largest
    first (a row with more boxes keeps the largest), and nbox (M,) the real boxes per row. A batch is then
    an index into these tensors, and its answer tokens are made by answer_tokens after augmentation."""
    images = torch.stack([load_images(s, image_size, mean, std).half() for s in samples])
    boxes = torch.zeros(len(samples), max_boxes, 4)
    nbox = torch.zeros(len(samples), dtype=torch.long)
    for i, s in enumerate(samples):
        kept = sorted(s.boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)[:max_boxes]
        W, H = s.size
        for j, (x0, y0, x1, y1) in enumerate(kept):
            boxes[i, j] = torch.tensor([x0 / W, y0 / H, x1 / W, y1 / H])
        nbox[i] = len(kept)
    return images, boxes, nbox


def answer_tokens(boxes, nbox, num_bins, loc_start, box_end_id, eos_id, pad_id):
    """The batched, on-device answer_ids: boxes (B, K, 4) normalised, nbox (B,) ->
    answer (B, 4K + 2) = locations of the first nbox boxes, </box>, EOS, then pad_id; and answer_mask
    (B, 4K + 2), True on the real answer tokens. Fixed shapes, so the model sees one graph."""
    B, K, _ = boxes.shape
    bins = (boxes * num_bins).floor().clamp(0, num_bins - 1).long()
    j = torch.arange(4 * K + 2, device=boxes.device).expand(B, -1)        # (B, L) position in the answer
    n = 4 * nbox.view(B, 1)                                               # where </box> goes
    locs = torch.cat([loc_start + bins.view(B, 4 * K), torch.zeros_like(j[:, :2])], 1)
    answer = torch.where(j < n, locs, torch.where(j == n, box_end_id, torch.where(j == n + 1, eos_id, pad_id)))
    return answer, j <= n + 1


@dataclass
class Augment:
    """Random augmentation of a batch that moves the boxes with the pixels. Each study gets one geometric
    transform shared by its modalities (they are co-registered) and an intensity jitter per modality.
    All randomness comes from `generator`, so a resumed run sees the same batches."""
    flip: float = 0.5          # probability of a left-right mirror (a tumour is as likely in either hemisphere)
    scale: float = 0.1         # zoom drawn from [1 - scale, 1 + scale]
    translate: float = 0.1     # shift, as a share of the image side
    rotate: float = 5.0        # degrees in [-rotate, rotate]; the new box encloses the rotated one
    contrast: float = 0.2      # per-modality gain in [1 - contrast, 1 + contrast]
    brightness: float = 0.2    # per-modality offset, in normalised units
    noise: float = 0.05        # std of added Gaussian noise, in normalised units

    def scaled(self, k: float) -> "Augment":
        """Every range times k (the flip probability stays)."""
        return Augment(self.flip, *(k * getattr(self, f) for f in
                                    ("scale", "translate", "rotate", "contrast", "brightness", "noise")))

    def __call__(self, images, boxes, generator=None):
        """images (B, N, C, S, S), boxes (B, K, 4) normalised -> both transformed, same shapes."""
        B, N, C, S, _ = images.shape
        rand = lambda *shape: torch.rand(*shape, generator=generator).to(images.device)
        # F.affine_grid's convention: output point u (in [-1, 1]) samples the input at A @ u + t.
        angle = (rand(B) * 2 - 1) * math.radians(self.rotate)
        zoom = 1 + (rand(B) * 2 - 1) * self.scale
        mirror = torch.where(rand(B) < self.flip, -1.0, 1.0)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        A = torch.stack([torch.stack([cos * mirror, -sin], -1), torch.stack([sin * mirror, cos], -1)], -2)  # (B, 2, 2)
        t = (rand(B, 2) * 2 - 1) * 2 * self.translate                                                         # (B, 2)
        grid = F.affine_grid(torch.cat([A, t[:, :, None]], 2), (B, N * C, S, S), align_corners=False)
        x = F.grid_sample(images.reshape(B, N * C, S, S).float(), grid, mode="bilinear",
                          padding_mode="border", align_corners=False).view(B, N, C, S, S)
        gain = 1 + (rand(B, N, 1, 1, 1) * 2 - 1) * self.contrast
        offset = (rand(B, N, 1, 1, 1) * 2 - 1) * self.brightness
        x = x * gain + offset + torch.randn(x.shape, generator=generator).to(x.device) * self.noise
        # Boxes: an input corner p maps to the output point u = A^-1 (p - t); the new box encloses the four.
        p = boxes * 2 - 1                                                                          # (B, K, 4)
        corners = torch.stack([p[..., [0, 1]], p[..., [2, 1]], p[..., [0, 3]], p[..., [2, 3]]], -2)  # (B, K, 4, 2)
        u = torch.einsum("bij,bkcj->bkci", torch.linalg.inv(A), corners - t[:, None, None, :])
        return x, ((torch.cat([u.amin(-2), u.amax(-2)], -1) + 1) / 2).clamp(0, 1)


# -----------------------------------------------------------------------------
# patients: adjacent slices of one brain nearly repeat each other, so split by patient, never by slice

_CASE = re.compile(r"^(.+)_\d+(?:-\d+)?_\d+$")
CASE_KEYS = ("case", "patient", "patient_id", "subject")  # a row key naming the patient wins over its file names


def case_id(*paths):
    """The patient of a row, from its image names: our converter's and the blog's names match _CASE
    ('BraTS-GLI-00000-000_2_0.jpg' -> 'BraTS-GLI-00000-000', 'BraTS2015-pat0001_1_0-077_3.jpg' ->
    'BraTS2015-pat0001_1'). Other names: what the row's images share before their modality part,
    less a trailing slice number ('TCGA_CS_4941_19960909_12_flair.png' + '..._12_t1c.png' ->
    'TCGA_CS_4941_19960909'); when nothing is left (names like '12_flair.png'), the folder name."""
    stems = [Path(p).stem for p in paths]
    m = _CASE.match(stems[0])
    if m:
        return m.group(1)
    name = os.path.commonprefix(stems)
    if len(set(stems)) > 1:  # cut a shared start of the modality names ('_t' of '_t1c' and '_t2f')
        name = name[: max(name.rfind(c) for c in "_-. ") + 1]
    name = re.sub(r"[_\-. ]*\d+[_\-. ]*$", "", name).rstrip("_-. ")
    return name or Path(paths[0]).parent.name or stems[0]


def _val_cases(cases, val_fraction, seed):
    cases = sorted(set(cases))
    random.Random(seed).shuffle(cases)
    n = round(len(cases) * val_fraction)
    if val_fraction > 0 and len(cases) > 1:
        n = min(max(n, 1), len(cases) - 1)  # at least one case on each side
    return set(cases[:n])


def split_by_patient(samples, val_fraction=0.1, seed=0):
    """-> (train, val) samples, each in the input order; every case goes wholly to one side."""
    val = _val_cases([s.case for s in samples], val_fraction, seed)
    return [s for s in samples if s.case not in val], [s for s in samples if s.case in val]


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_contact_sheet(jsonl_path, png_path, max_rows=12, tile=128):
    """A PNG grid to check a dataset by eye: one row per sample (evenly spread over the file), one
    column per modality, boxes in red."""
    modalities, samples = read_summary(jsonl_path, require_boxes=False, check_images=False)
    picks = [samples[round(i * (len(samples) - 1) / max(1, max_rows - 1))] for i in range(min(max_rows, len(samples)))]
    head = 14
    sheet = Image.new("RGB", (tile * len(modalities), head + tile * len(picks)))
    draw = ImageDraw.Draw(sheet)
    for j, m in enumerate(modalities):
        draw.text((j * tile + 3, 1), m, fill=(255, 255, 0))
    for i, s in enumerate(picks):
        W, H = s.size
        for j, p in enumerate(s.paths):
            with Image.open(p) as im:
                sheet.paste(im.convert("RGB").resize((tile, tile), Image.BICUBIC), (j * tile, head + i * tile))
            for b in s.boxes:
                x0, y0, x1, y1 = b[0] * tile / W, b[1] * tile / H, b[2] * tile / W, b[3] * tile / H
                draw.rectangle([j * tile + x0, head + i * tile + y0, j * tile + x1 - 1, head + i * tile + y1 - 1],
                               outline=(255, 0, 0))
        draw.text((2, head + i * tile + tile - 12), Path(s.paths[0]).stem[:-2], fill=(0, 255, 0))
    sheet.save(png_path)
    return png_path


def _box_of(mask):
    """Whole-tumour mask (H, W) -> [maxx, maxy, minx, miny] in pixel-edge coordinates (covers the pixels)."""
    ys, xs = np.nonzero(mask)
    return [int(xs.max()) + 1, int(ys.max()) + 1, int(xs.min()), int(ys.min())]


def _save_gray(u8, path):
    Image.fromarray(u8, mode="L").save(path, quality=95)


# -----------------------------------------------------------------------------
# demo dataset: synthetic BraTS-like slices from a phantom brain, made with numpy in milliseconds a slice.

# Tissue classes of the phantom and their relative signal in each modality (t2f, t2w, t1n, t1c):
# CSF is bright on T2 and dark on FLAIR (fluid suppressed) and T1; white matter is brighter than grey on
# T1 and darker on T2/FLAIR; oedema is bright on FLAIR and T2; the enhancing rim lights up after contrast
# (t1c); the necrotic core is dark on T1 and bright on T2.
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
    return np.fft.irfft2(np.fft.rfft2(img) * np.exp(-2 * np.pi ** 2 * sigma ** 2 * (fx ** 2 + fy ** 2)), s=img.shape)


def _smooth_noise(rng, S, sigma):
    n = _blur(rng.standard_normal((S, S)), sigma)
    return n / (n.std() + 1e-8)


def _harmonics(rng, kmax, amp):
    """A random smooth closed outline: radius factor as a function of angle (a 1024-entry table, fast)."""
    k = np.arange(2, kmax + 1)
    a, ph = rng.normal(0, amp, len(k)) / np.sqrt(k - 1), rng.uniform(0, 2 * np.pi, len(k))
    t = np.linspace(-np.pi, np.pi, 1024, endpoint=False)
    table = (1 + (a * np.cos(k * t[:, None] + ph)).sum(-1)).astype(np.float32)
    return lambda ang: table[((ang + np.pi) * (1024 / (2 * np.pi))).astype(np.int64) % 1024]


def _phantom_case(rng, S, n_slices):
    """One patient: yields labels (S, S) for n_slices axial slices through its tumour (which grows and
    shrinks from slice to slice, as a spheroid cut at different heights)."""
    cx, cy = S / 2 + rng.normal(0, 0.015 * S), S / 2 + rng.normal(0, 0.015 * S)
    ax, ay = rng.uniform(0.32, 0.37) * S, rng.uniform(0.40, 0.45) * S  # half width, half length (front-back)
    tilt = rng.uniform(-0.12, 0.12)
    outline, depth, twist = _harmonics(rng, 6, 0.03), _harmonics(rng, 9, 0.5), _harmonics(rng, 7, 1.5)
    gyri_n, gyri_ph, wobble = rng.integers(15, 22), rng.uniform(0, 2 * np.pi), _harmonics(rng, 7, 1.2)
    vent_size = rng.uniform(0.7, 1.4)
    # tumour: centre in one hemisphere, core radius, oedema reach, necrotic fraction, irregular outlines
    side = rng.choice([-1, 1])
    tp, tq = side * rng.uniform(0.15, 0.55) * ax, rng.uniform(-0.55, 0.55) * ay
    rt = rng.uniform(0.05, 0.13) * S
    re_ = rt * rng.uniform(1.3, 2.0)
    nec = rng.uniform(0.0, 0.65)
    t_out, e_out, n_out = _harmonics(rng, 5, 0.12), _harmonics(rng, 7, 0.12), _harmonics(rng, 4, 0.12)
    e_field, t_field = _smooth_noise(rng, S, S / 14), _smooth_noise(rng, S, S / 20)  # lobulated edges
    zt, rzt = rng.uniform(-0.25, 0.35), rng.uniform(0.15, 0.3)
    drift = rng.normal(0, 0.08 * S, 2)  # the tumour's centre moves a little from slice to slice
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    c, s_ = np.cos(tilt), np.sin(tilt)
    p, q = c * (xx - cx) + s_ * (yy - cy), -s_ * (xx - cx) + c * (yy - cy)  # brain frame: p left-right, q front-back
    th = np.arctan2(q / ay, p / ax)
    r_outline = outline(th) + 0.05 * np.sin(th)  # egg-shaped: narrower in front
    psi0 = gyri_n * th + gyri_ph + wobble(th)
    for z in zt + rzt * np.linspace(-0.75, 0.75, n_slices):
        sc = np.sqrt(max(0.2, 1 - (z / 1.1) ** 2))  # the brain narrows away from its middle
        rho = np.hypot(p / (ax * sc), q / (ay * sc)) / r_outline
        lab = np.full((S, S), WM, np.int64)
        psi = psi0 + twist(th) * (rho - 0.85) * 6  # sulci curve instead of running straight inwards
        fold = np.cos(psi)
        lab[rho > 0.81 + 0.06 * fold * np.clip(depth(th), 0.3, 1.7)] = GM  # cortex ribbon folded into gyri
        lab[(rho > 0.70 + 0.1 * depth(th + 1)) & (fold < -0.95)] = CSF  # sulci
        lab[rho > 0.965] = CSF  # thin CSF around the brain
        lab[(np.abs(p) < 0.04 * S) & (np.abs(q) > 0.3 * ay * sc)] = GM  # medial cortex
        lab[(np.abs(p) < 0.012 * S) & (np.abs(q) > 0.3 * ay * sc)] = CSF  # interhemispheric fissure
        v = max(0.0, 1 - (z / 0.5) ** 2) * vent_size
        if v > 0.05:
            for sgn in (-1, 1):  # deep grey nuclei, then the lateral ventricles' butterfly
                lab[((p - sgn * 0.14 * S) / (0.06 * S)) ** 2 + ((q - 0.03 * S) / (0.1 * S)) ** 2 < min(1, v)] = DEEP_GM
                wy = 0.2 * S * min(1.0, v) + 1
                off = sgn * (0.04 * S + 0.05 * S * (q / wy) ** 2)
                lab[((p - off) / (0.028 * S * v + 0.5)) ** 2 + ((q + 0.02 * S) / wy) ** 2 < 1] = CSF
        brain = rho < 1
        # tumour at this level: radii shrink towards its top and bottom, outlines irregular and lobulated
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
        img *= np.exp(0.5 * (a[0] * xx + a[1] * yy + a[2] * xx * yy + a[3] * xx ** 2 + a[4] * yy ** 2))  # bias field
        sigma = 0.03
        img = np.hypot(img + rng.normal(0, sigma, img.shape), rng.normal(0, sigma, img.shape))  # Rician noise
        img *= inside  # skull-stripped: black outside the brain
        hi = np.percentile(img[brain], 99.5)
        out.append(np.clip(img / hi * 235, 0, 255).astype(np.uint8))
    return out


def make_demo(out_dir, cases=60, slices_per_case=6, seed=0, size=128):
    """Write a synthetic BraTS-like dataset: out_dir/images/DEMO-<case>-000_<slice>_<mod>.jpg, a
    summary.jsonl with "<mod> Axial_path" keys and whole-tumour boxes [[maxx, maxy, minx, miny]], and
    contact_sheet.png. Deterministic for a seed. Returns the summary.jsonl path."""
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
                _save_gray(img, out_dir / name)
                row[f"{m} Axial_path"] = name
            row["box"] = [_box_of(whole)]
            rows.append(row)
    write_jsonl(out_dir / "summary.jsonl", rows)
    write_contact_sheet(out_dir / "summary.jsonl", out_dir / "contact_sheet.png")
    return out_dir / "summary.jsonl"


# -----------------------------------------------------------------------------
# BraTS converter. NIfTI-1 is read by a small reader of our own (gzip + struct + numpy, below) rather
# than nibabel: BraTS volumes are plain single-file NIfTI-1, ~60 lines cover them, and users need no
# extra (large) dependency to convert their data.

_NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}


def read_nifti(path):
    """A NIfTI-1 file (.nii or .nii.gz) -> (volume float32 (X, Y, Z) in RAS+ order: index grows towards
    the patient's Right, Anterior, Superior, intensity scaling applied)."""
    path = Path(path)
    raw = gzip.open(path).read() if path.name.endswith(".gz") else path.read_bytes()
    if len(raw) < 352:
        raise DataError(f"{path}: too short for a NIfTI-1 file")
    e = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    if struct.unpack(e + "i", raw[:4])[0] != 348 or raw[344:347] != b"n+1":
        raise DataError(f"{path}: not a single-file NIfTI-1 image (NIfTI-2 and .hdr/.img pairs are not supported)")
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
    shape = tuple(max(1, d) for d in dim[1:4])
    count = shape[0] * shape[1] * shape[2]
    dt = np.dtype(e + _NIFTI_DTYPES[dtype])
    data = np.frombuffer(raw, dt, count, vox_offset).reshape(shape, order="F")  # NIfTI stores x fastest
    if slope not in (0.0, 1.0) or inter != 0.0:  # scl_slope 0 means "no scaling"
        data = data.astype(np.float64) * (slope if slope else 1.0) + inter
    data = data.astype(np.float32)
    # voxel axes -> world (RAS+) directions: the sform if set, else the qform, else the identity
    if sform_code > 0:
        rot = np.array(struct.unpack(e + "12f", raw[280:328]), np.float64).reshape(3, 4)[:, :3]
    elif qform_code > 0:
        b, c, d = struct.unpack(e + "3f", raw[256:268])
        a = math.sqrt(max(0.0, 1 - b * b - c * c - d * d))
        rot = np.array([[a*a + b*b - c*c - d*d, 2*(b*c - a*d), 2*(b*d + a*c)],
                        [2*(b*c + a*d), a*a + c*c - b*b - d*d, 2*(c*d - a*b)],
                        [2*(b*d - a*c), 2*(c*d + a*b), a*a + d*d - c*c - b*b]])
        rot[:, 2] *= -1 if pixdim[0] < 0 else 1  # qfac
    else:
        rot = np.eye(3)
    world = np.abs(rot).argmax(0)  # which world axis each voxel axis runs along
    if sorted(world) != [0, 1, 2]:
        raise DataError(f"{path}: oblique orientation; cannot tell which axis is which")
    for i in range(3):
        if rot[world[i], i] < 0:
            data = np.flip(data, i)
    return np.ascontiguousarray(data.transpose(np.argsort(world)))  # (R, A, S)


def _slice(vol, view, k):
    """An upright 2-D slice of a RAS+ volume, radiological convention (the patient's right on the image's
    left): axial with the nose up, coronal and sagittal with the top of the head up (sagittal facing left)."""
    if view == "axial":
        return vol[::-1, ::-1, k].T  # rows: anterior -> posterior
    if view == "coronal":
        return vol[::-1, k, ::-1].T  # rows: superior -> inferior
    return vol[k, ::-1, ::-1].T  # sagittal; columns: anterior -> posterior


def _window(vol, brain, lo_pct=0.5, hi_pct=99.5):
    """Intensities -> uint8 by percentiles inside the brain (robust to any scale: int, float, z-scored);
    black outside the brain."""
    lo, hi = np.percentile(vol[brain], [lo_pct, hi_pct])
    out = np.clip((vol - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    return np.where(brain, out, 0).astype(np.uint8)


def convert_brats(src, out, views=("axial",), min_tumor_px=100, val_fraction=0.2, seed=0, log=print):
    """BraTS case folders `<case>/<case>-<mod>.nii.gz` -> JPEG slices and jsonl rows (see DESIGN.md).

    Keeps slices with at least min_tumor_px whole-tumour pixels (seg > 0). Images are
    out/images/<case>_<viewindex>-<slice>_<modindex>.jpg (view index in VIEWS, modality index in the row's
    key order). Writes summary.jsonl (all rows), train.jsonl and val.jsonl (split by patient). Rows of
    different views have different keys, so with several views each view gets its own folder out/<view>/.
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
        if mods is None:
            mods = present
            log(f"modalities: {', '.join(mods)}")
        if present != mods:
            log(f"{d.name}: modalities {present} differ from the first case's {mods}, skipped")
            continue
        seg = read_nifti(files["seg"]) > 0
        vols = [read_nifti(files[m]) for m in mods]
        if any(v.shape != seg.shape for v in vols):
            log(f"{d.name}: volumes of different shapes {[v.shape for v in vols]}, skipped")
            continue
        # the brain: a brainmask volume when present (z-scored data has a nonzero background), else nonzero voxels
        brain = read_nifti(files["brainmask"]) > 0 if "brainmask" in files else np.any([v != 0 for v in vols], 0)
        images = [_window(v, brain) for v in vols]
        added = {}
        for view in views:
            vi, axis = VIEWS.index(view), {"axial": 2, "coronal": 1, "sagittal": 0}[view]
            folder = out if len(views) == 1 else out / view
            (folder / "images").mkdir(parents=True, exist_ok=True)
            counts = seg.sum(tuple(a for a in range(3) if a != axis))
            for k in np.nonzero(counts >= min_tumor_px)[0]:
                row = {}
                for j, (m, img) in enumerate(zip(mods, images)):
                    name = f"images/{d.name}_{vi}-{k:03d}_{j}.jpg"
                    _save_gray(np.ascontiguousarray(_slice(img, view, k)), folder / name)
                    row[f"{m} {view.capitalize()}_path"] = name
                row["box"] = [_box_of(_slice(seg, view, k))]
                rows[view].append(row)
            added[view] = int((counts >= min_tumor_px).sum())
        log(f"{d.name}: " + ", ".join(f"{view} {n} slices" for view, n in added.items()))
    if mods is None:
        raise DataError(f"{src}: no case has a seg file; nothing to convert")
    for view in views:
        folder = out if len(views) == 1 else out / view
        val = _val_cases([case_id(next(iter(r.values()))) for r in rows[view]], val_fraction, seed)
        is_val = [case_id(next(iter(r.values()))) in val for r in rows[view]]
        write_jsonl(folder / "summary.jsonl", rows[view])
        write_jsonl(folder / "train.jsonl", [r for r, v in zip(rows[view], is_val) if not v])
        write_jsonl(folder / "val.jsonl", [r for r, v in zip(rows[view], is_val) if v])
        if rows[view]:
            write_contact_sheet(folder / "summary.jsonl", folder / "contact_sheet.png")
        log(f"{view}: {len(rows[view])} slices, {len(val)} validation cases ({', '.join(sorted(val))}) -> {folder}")
    return {v: len(rows[v]) for v in views}


# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    parser = argparse.ArgumentParser(description="Make datasets for minigpt-mri.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="write a synthetic BraTS-like demo dataset")
    p.add_argument("out_dir", help="output folder (images/, summary.jsonl, contact_sheet.png)")
    p.add_argument("--cases", type=int, default=60, help="number of synthetic patients (default 60)")
    p.add_argument("--slices", type=int, default=6, help="slices per patient (default 6)")
    p.add_argument("--size", type=int, default=128, help="image size in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")
    p = sub.add_parser("brats", help="convert BraTS NIfTI case folders into JPEG slices and jsonl")
    p.add_argument("src_dir", help="folder of case folders <case>/<case>-{t2f,t2w,t1n,t1c,seg}.nii.gz")
    p.add_argument("out_dir", help="output folder (images/, summary.jsonl, train.jsonl, val.jsonl, contact_sheet.png)")
    p.add_argument("--views", default="axial", help="comma-separated subset of axial,coronal,sagittal (default axial)")
    p.add_argument("--min-tumor-px", type=int, default=100, help="keep slices with at least this many tumour pixels (default 100)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction of patients for val.jsonl (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient split (default 0)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        path = make_demo(args.out_dir, args.cases, args.slices, args.seed, args.size)
        print(f"wrote {path} and {Path(args.out_dir) / 'contact_sheet.png'}")
    else:
        views = [v.strip().lower() for v in args.views.split(",") if v.strip()]
        bad = [v for v in views if v not in VIEWS]
        if bad or not views:
            parser.error(f"--views: unknown view(s) {bad}; choose from {', '.join(VIEWS)}")
        convert_brats(args.src_dir, args.out_dir, views, args.min_tumor_px, args.val_fraction, args.seed)


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        raise SystemExit(f"error: {e}")

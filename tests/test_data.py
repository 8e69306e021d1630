"""Tests of data.py: the data contract, boxes, tokenizer, batches, patient split."""
import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import DataError


def gray(path, W=40, H=30, value=128):
    Image.fromarray(np.full((H, W), value, np.uint8)).save(path)
    return path.name


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def ds(tmp_path):
    """Two modalities, 40x30 images; returns a function making a summary.jsonl from extra rows."""
    for n in ("a_0", "a_1", "b_0", "b_1"):
        gray(tmp_path / f"{n}.png")
    good = {"t2f Axial_path": "a_0.png", "t1c Axial_path": "a_1.png", "box": [[30, 20, 10, 5]]}

    def make(*rows):
        return write_rows(tmp_path / "s.jsonl", [good, *rows])
    return make, good


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return data.Tokenizer.train(path, num_bins=32, max_images=4)


# -- summary.jsonl ---------------------------------------------------------------------------------

def test_read_summary_good(ds, tmp_path):
    make, good = ds
    row2 = {"t1c Axial_path": str(tmp_path / "b_1.png"), "t2f Axial_path": "b_0.png",
            "box": [[0, 0, 5, 6], [-4, 25, 45, 28]], "x": 1}
    mods, samples = data.read_summary(make("", row2))
    assert mods == ["t2f Axial", "t1c Axial"]
    assert [s.line for s in samples] == [1, 3]
    assert samples[0].boxes == [[10, 5, 30, 20]] and samples[0].size == (40, 30)
    # in the first row's order
    assert samples[1].paths == [str(tmp_path / "b_0.png"), str(tmp_path / "b_1.png")]
    assert samples[1].boxes == [[0, 0, 5, 6], [0, 25, 40, 28]]  # partly outside: clipped
    assert samples[1].row["x"] == 1


def test_read_summary_xywh_and_output(ds):
    make, good = ds
    path = write_rows(make().parent / "x.jsonl", [{**good, "box": [[10, 5, 20, 15]]}])
    _, samples = data.read_summary(path, box_format="xywh")
    assert samples[0].boxes == [[10, 5, 30, 20]]
    assert data.box_to_output([10, 5, 30, 20], "corners") == [30, 20, 10, 5]
    assert data.box_to_output([10, 5, 30, 20], "xywh") == [10, 5, 20, 15]
    assert json.dumps(data.box_to_output([10, 5, 30, 20], "corners")) == "[30, 20, 10, 5]"  # ints


def test_box_to_output_rounds_to_a_tenth_of_a_pixel():
    """A model's box (bin centres times the image size, in float32) is written in 0.1 px floats."""
    box = [np.float32(10.04), 5.26, 103.82115173339844, torch.tensor(20.01)]
    corners = data.box_to_output(box, "corners")
    assert corners == [103.8, 20.0, 10.0, 5.3] and all(type(v) is float for v in corners)
    assert json.dumps(corners) == "[103.8, 20.0, 10.0, 5.3]"
    assert json.dumps(data.box_to_output(box, "xywh")) == "[10.0, 5.3, 93.8, 14.7]"  # x + w = maxx


def test_missing_box_allowed_for_prediction(ds):
    make, good = ds
    path = make({k: v for k, v in good.items() if k != "box"})
    with pytest.raises(DataError, match=r"s\.jsonl:2: no 'box' key"):
        data.read_summary(path)
    assert data.read_summary(path, require_boxes=False)[1][1].boxes == []


PAIR = {"t2f Axial_path": "a_0.png", "t1c Axial_path": "a_1.png"}  # the images of ds's first row


@pytest.mark.parametrize("bad, message", [
    ('{"t2f Axial_path": "a_0.png", ', r"s\.jsonl:2: invalid JSON"),
    ({**PAIR, "t2f Axial_path": "nope.png", "box": [[1, 1, 2, 2]]},
     r"s\.jsonl:2: 't2f Axial_path' image not found: .*nope\.png"),
    ({**PAIR, "t2f Axial_path": "bad.png", "box": [[1, 1, 2, 2]]},
     r"s\.jsonl:2: 't2f Axial_path' cannot be read as an image: .*bad\.png"),
    ({"t2f Axial_path": "a_0.png", "t2w Axial_path": "a_1.png", "box": [[1, 1, 2, 2]]},
     r"s\.jsonl:2: modalities \['t2f Axial', 't2w Axial'\] differ from the first row's "
     r"\['t2f Axial', 't1c Axial'\]"),
    ({**PAIR, "t1c Axial_path": "big.png", "box": [[1, 1, 2, 2]]},
     r"s\.jsonl:2: images of one row must have one size, "
     r"got 't2f Axial_path' 40x30, 't1c Axial_path' 50x30"),
    ({**PAIR, "box": [[1, "a", 2, 2]]},
     r"s\.jsonl:2: 'box' entry \[1, 'a', 2, 2\] is not four numbers"),
    ({**PAIR, "box": [[1, 2, 3]]}, r"s\.jsonl:2: 'box' entry \[1, 2, 3\] is not four numbers"),
    ('{"t2f Axial_path": "a_0.png", "t1c Axial_path": "a_1.png", "box": [[1, NaN, 2, 2]]}',
     r"s\.jsonl:2: 'box' entry \[1, nan, 2, 2\] is not finite"),
    ({**PAIR, "box": [[5, 1, 5, 9]]},
     r"s\.jsonl:2: 'box' entry \[5, 1, 5, 9\] has zero \(or negative\) width or height"),
    ({**PAIR, "box": [[50, 1, 60, 9]]},
     r"s\.jsonl:2: 'box' entry \[50, 1, 60, 9\] lies entirely outside the 40x30 image"),
    ({**PAIR, "box": 3}, r"s\.jsonl:2: 'box' must be a list of boxes"),
    ('[1, 2]', r"s\.jsonl:2: expected a JSON object, got list"),
    ({"image": "a_0.png"}, r"s\.jsonl:2: no image keys"),
])
def test_bad_input_names_file_line_and_value(ds, tmp_path, bad, message):
    make, _ = ds
    (tmp_path / "bad.png").write_bytes(Image.new("L", (40, 30)).tobytes()[:100])  # not an image
    gray(tmp_path / "big.png", W=50)
    with pytest.raises(DataError, match=message):
        data.read_summary(make(bad))


def test_truncated_jpeg_is_corrupt(ds, tmp_path):
    make, good = ds
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "t.jpg")
    raw = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(raw[: len(raw) // 2])
    row = {**good, "t1c Axial_path": "t.jpg"}
    with pytest.raises(DataError, match=r"s\.jsonl:2: 't1c Axial_path' cannot be read as an image"):
        data.read_summary(make(row))


def test_binary_file_is_not_json_lines(tmp_path):
    """A --data file of random bytes (an image, an archive) stops with one line naming it, not a
    UnicodeDecodeError traceback."""
    (tmp_path / "r.jsonl").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataError, match=r"r\.jsonl: not a text file of JSON lines \(not UTF-8"):
        data.read_summary(tmp_path / "r.jsonl")


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=r"e\.jsonl: empty file"):
        data.read_summary(tmp_path / "e.jsonl")


# -- images and boxes ------------------------------------------------------------------------------

def test_load_image_gray_to_three_channels(tmp_path):
    ramp = np.tile(np.arange(0, 250, 5, dtype=np.uint8), (20, 1))  # 50 x 20
    Image.fromarray(ramp).save(tmp_path / "g.png")
    x = data.load_image(tmp_path / "g.png", 16, mean=(0, 0, 0), std=(1, 1, 1))
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    assert x[0, :, 0].max() < 0.1 and x[0, :, -1].min() > 0.85  # dark left, bright right: upright
    y = data.load_image(tmp_path / "g.png", 16)
    assert torch.allclose(y[1], (x[1] - data.CLIP_MEAN[1]) / data.CLIP_STD[1], atol=1e-6)


def test_box_bins_round_trip_worst_case():
    W, H, bins = 240, 155, 32
    assert data.box_to_bins([0, 0, W, H], W, H, bins) == [0, 0, bins - 1, bins - 1]
    assert data.box_to_bins([7.5, 0, 15, 4.9], W, H, bins) == [1, 0, 2, 1]
    assert data.bins_to_box([3, 5, 1, 2], W, H, bins) == [1.5 * W / bins, 2.5 * H / bins,
                                                          3.5 * W / bins, 5.5 * H / bins]
    worst = [0.0, 0.0]
    for v in np.linspace(0, 1, 997):
        box = [v * W, v * H, v * W, v * H]
        back = data.bins_to_box(data.box_to_bins(box, W, H, bins), W, H, bins)
        worst = [max(worst[0], abs(back[0] - box[0])), max(worst[1], abs(back[1] - box[1]))]
    assert worst[0] <= W / (2 * bins) + 1e-9 and worst[1] <= H / (2 * bins) + 1e-9
    assert worst[0] > 0.95 * W / (2 * bins)  # the bound is reached, so it is the worst case


def test_to_pixels_and_back():
    assert data.to_pixels([0.25, 0.5, 0.75, 1.0], (0, 0, 40, 30)) == [10.0, 15.0, 30.0, 30.0]
    box = torch.tensor([0.0, 0.1, 0.5, 0.2])
    assert data.to_pixels(box, (0, 0, 10, 20)) == pytest.approx([0.0, 2.0, 5.0, 4.0])
    # a window from (8, 4), 13 x 10 pixels: 0.5 of its width is 8 + 6.5
    assert data.to_pixels([0.5, 0.0, 1.0, 0.5], (8, 4, 13, 10)) == [14.5, 4.0, 21.0, 9.0]
    assert data.to_window([14.5, 4.0, 21.0, 9.0], (8, 4, 13, 10)) == [0.5, 0.0, 1.0, 0.5]
    # a box reaching past the window keeps its part inside it
    assert data.to_window([0.0, 9.0, 30.0, 30.0], (8, 4, 13, 10)) == [0.0, 0.5, 1.0, 1.0]


def _head(W, H, x0, y0, x1, y1, value=200, mode="L"):
    a = np.zeros((H, W), np.uint8)
    a[y0:y1, x0:x1] = value
    return Image.fromarray(a).convert(mode)


def test_head_window_by_hand():
    # a 10 x 10 head at x 10-19, y 5-14 of a 40 x 30 image: side round(10 * 1.1) + 2 = 13,
    # centred: left round((10 + 20 - 13) / 2) = 8 (8.5 rounds to even), top round(3.5) = 4
    assert data.head_window([_head(40, 30, 10, 5, 20, 15)]) == [8, 4, 13, 13]
    # the modalities of one study share one window: the union of what stands out in each
    got = data.head_window([_head(40, 30, 10, 5, 20, 15), _head(40, 30, 16, 8, 24, 12)])
    # x 10-23 (14 wide), y 5-14: side round(15.4) + 2 = 17; left round(8.5) = 8, top round(1.5) = 2
    assert got == [8, 2, 17, 17]
    # pixels below CROP_AT of the 99th percentile are background; 16-bit grey (mode F) reads alike
    faint = np.zeros((30, 40), np.float32)
    faint[5:15, 10:20], faint[0, 0] = 1.0, 0.09
    assert data.head_window([Image.fromarray(faint, mode="F")]) == [8, 4, 13, 13]
    # cut at the image's edges; nothing standing out: the whole image
    assert data.head_window([_head(40, 30, 0, 0, 40, 25)]) == [0, 0, 40, 30]
    assert data.head_window([_head(40, 30, 0, 0, 40, 30, value=0)]) == [0, 0, 40, 30]


def test_head_window_on_a_noisy_scanner_background():
    # a bright head (a disk of radius 40 at (70, 60)) on Rician-like noise, as scanners write it
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :160]
    a = np.abs(rng.normal(0, 6, (128, 160)) + 1j * rng.normal(0, 6, (128, 160)))
    a[(xx - 70) ** 2 + (yy - 60) ** 2 <= 40 ** 2] += 150
    noisy = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    pixels = np.asarray(noisy, dtype=np.float32)  # many single noise pixels pass the threshold
    assert (pixels[(xx - 70) ** 2 + (yy - 60) ** 2 > 45 ** 2]
            > data.CROP_AT * np.percentile(pixels, 99)).sum() > 100
    x0, y0, w, h = data.head_window([noisy])  # blocks of 4 pixels
    assert w == h and abs(x0 + w / 2 - 70.5) <= 3 and abs(y0 + h / 2 - 60.5) <= 3
    assert 81 * 1.1 - 6 <= w <= 81 * 1.1 + 8  # the disk's 81 pixels and the margin, not the noise


def test_load_images_through_the_head_window(tmp_path):
    for k in (0, 1):  # a study of two modalities, its head at x 10-19 and 11-19, y 5-14
        _head(40, 30, 10 + k, 5, 20, 15).save(tmp_path / f"h_{k}.png")
    row = {"t2f Axial_path": "h_0.png", "t1c Axial_path": "h_1.png", "box": [[12, 6, 18, 12]]}
    _, samples = data.read_summary(write_rows(tmp_path / "h.jsonl", [row]))
    x, window = data.load_images(samples[0], 16, crop="head")
    assert window == [8, 4, 13, 13]
    with Image.open(tmp_path / "h_1.png") as im:  # the crop by hand, then the plain reading
        ref = data.image_tensor(im.crop((8, 4, 21, 17)), 16)
    torch.testing.assert_close(x[1], ref)
    assert not torch.allclose(x[1], data.load_image(tmp_path / "h_1.png", 16))
    images, boxes, nbox, windows = data.load_tensors(samples, 16, 1, crop="head")
    torch.testing.assert_close(images[0].float(), x, atol=2e-3, rtol=0)
    assert windows == [window]
    # the target is the box in the window: x (12 - 8) / 13, y (6 - 4) / 13, ...
    torch.testing.assert_close(boxes[0, 0], torch.tensor([4 / 13, 2 / 13, 10 / 13, 8 / 13]))
    assert data.to_pixels(boxes[0, 0], window) == pytest.approx([12, 6, 18, 12])


def test_zoom_window_by_hand_and_its_jitter_keeps_the_box():
    # twice the box's longer side (20), centred on it: (20, 25) -> [0, 5, 40, 40]
    assert data.zoom_window([10, 20, 30, 30], 100, 80) == [0, 5, 40, 40]
    # a 2-pixel box: a quarter of the shorter side (20) instead, past the image's edge allowed
    assert data.zoom_window([50, 50, 52, 52], 100, 80) == [41, 41, 20, 20]
    assert data.zoom_window([0, 0, 30, 10], 100, 80) == [-15, -25, 60, 60]
    rng = random.Random(0)
    sides, shifts = [], []
    for _ in range(300):
        x0, y0, w, h = data.zoom_window([10, 20, 30, 30], 100, 80, rng)
        assert w == h and x0 <= 10 and y0 <= 20 and x0 + w >= 30 and y0 + h >= 30
        sides.append(w)
        shifts.append((x0 + w / 2 - 20) / w)
    scale, shift = data.ZOOM_JITTER
    assert 40 / scale - 1 <= min(sides) < 37 and 43 < max(sides) <= 40 * scale + 1
    assert -shift - 0.02 <= min(shifts) < -0.1 and 0.1 < max(shifts) <= shift + 0.02


def test_zoom_tensors_read_the_zoomed_view_of_each_row_with_a_box(tmp_path):
    for k in (0, 1):
        _head(40, 30, 10 + k, 5, 20, 15).save(tmp_path / f"h_{k}.png")
    rows = [{"t2f Axial_path": "h_0.png", "t1c Axial_path": "h_1.png", "box": [[12, 6, 18, 12]]},
            {"t2f Axial_path": "h_0.png", "t1c Axial_path": "h_1.png", "box": []},
            {"t2f Axial_path": "h_1.png", "t1c Axial_path": "h_0.png",
             "box": [[30, 20, 31, 21], [2, 2, 12, 10]]}]
    _, samples = data.read_summary(write_rows(tmp_path / "h.jsonl", rows), require_boxes=False)
    images, boxes, nbox = data.zoom_tensors(samples, 16, 2, seed=3)
    assert images.shape == (2, 2, 3, 16, 16) and nbox.tolist() == [1, 1]  # no row without a box
    rng = random.Random(3)  # the same draws, by hand: each row's window, then its crop
    for i, (s, box) in enumerate([(samples[0], [12, 6, 18, 12]), (samples[2], [2, 2, 12, 10])]):
        window = data.zoom_window(box, 40, 30, rng)  # the largest box of the row
        x0, y0, w, h = window
        with Image.open(tmp_path / s.row["t1c Axial_path"]) as im:  # past the edges: black
            ref = data.image_tensor(im.crop((x0, y0, x0 + w, y0 + h)), 16)
        torch.testing.assert_close(images[i, 1].float(), ref, atol=2e-3, rtol=0)
        torch.testing.assert_close(boxes[i, 0], torch.tensor(data.to_window(box, window)))
        assert boxes[i, 1].tolist() == [0, 0, 0, 0]
        assert data.to_pixels(boxes[i, 0], window) == pytest.approx(box)
    again = data.zoom_tensors(samples, 16, 2, seed=3)
    assert torch.equal(again[0], images) and torch.equal(again[1], boxes)
    assert not torch.equal(data.zoom_tensors(samples, 16, 2, seed=4)[1], boxes)
    assert data.zoom_tensors(samples[1:2], 16, 2, seed=3) is None


def test_box_iou():
    assert data.box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert math.isclose(data.box_iou([0, 0, 10, 10], [5, 0, 15, 10]), 50 / 150)
    assert data.box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0


# -- tokenizer, prompt, answer --------------------------------------------------------------------

def test_tokenizer_training_is_deterministic(tmp_path, tok):
    again = data.Tokenizer.train(tmp_path / "t2.model", num_bins=32, max_images=4)
    assert (tmp_path / "t2.model").read_bytes() == open(tok.model_path, "rb").read()
    text = "<Img1> where is the tumor? 2024 ünïcode <box><loc_3></box>"
    assert again.encode(text) == tok.encode(text)


def test_specials_are_single_pieces_and_text_round_trips(tok):
    specials = data.special_tokens(32, 4)
    assert len(specials) == 2 + 8 + 32
    for t in specials:
        assert tok.encode(t) == [tok.special_ids[t]]
    assert [tok.loc_start + k for k in range(32)] == [tok.special_ids[f"<loc_{k}>"]
                                                      for k in range(32)]
    # digits split
    assert tok.encode("12")[-2:] == [tok.sp.piece_to_id("1"), tok.sp.piece_to_id("2")]
    text = "</Img2> where is the tumour? ±中 <box><loc_0><loc_31></box>"
    assert tok.decode(tok.encode(text)) == text  # byte fallback: nothing is lost
    assert tok.vocab_size == tok.sp.get_piece_size()
    assert tok.pad_id == 3 and tok.bos_id == 1 and tok.eos_id == 2


def test_prompt_chunk_layout(tok):
    chunks = data.prompt_chunks(tok, 3)
    ids = tok.special_ids
    assert len(chunks) == 4
    assert chunks[0] == [tok.bos_id, ids["<Img1>"]]
    assert chunks[1] == [ids["</Img1>"], ids["<Img2>"]]
    assert chunks[2] == [ids["</Img2>"], ids["<Img3>"]]
    assert chunks[3][0] == ids["</Img3>"] and chunks[3][-1] == tok.box_id
    assert tok.decode(chunks[3][1:-1]) == " where is the tumor? "
    v = data.prompt_chunks(tok, 1, "vicuna")
    assert tok.decode(v[0][1:]) == "###Human: <Img1>"
    assert tok.decode(v[1]) == "</Img1> where is the tumor? ###Assistant: <box>"
    assert data.prompt_text(1, "llama2") == ("[INST] <Img1><ImageHere></Img1> where is the tumor? "
                                             "[/INST] <box>")
    with pytest.raises(DataError, match="image tags for 1..4"):
        data.prompt_chunks(tok, 5)


def test_answer_ids_and_parse(tok):
    ids = data.answer_ids(tok, [[1, 2, 3, 4], [0, 31, 5, 6]])
    locs = [tok.loc_start + v for v in (1, 2, 3, 4, 0, 31, 5, 6)]
    assert ids == locs + [tok.box_end_id, tok.eos_id]
    assert data.parse_answer(tok, ids) == [[1, 2, 3, 4], [0, 31, 5, 6]]
    assert data.parse_answer(tok, ids[:6]) == [[1, 2, 3, 4]]  # trailing partial group dropped
    stopped = ids[:4] + [tok.box_end_id] + ids[4:8]
    assert data.parse_answer(tok, stopped) == [[1, 2, 3, 4]]  # stops at </box>
    assert data.parse_answer(tok, [tok.box_end_id]) == []


def test_llama_vocab_gets_specials_appended(tmp_path):
    """A sentencepiece model without our specials stands in for LLaMA's tokenizer.model."""
    import io
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["where is the tumor? the brain scan shows it"] * 50),
        model_writer=buf, model_type="bpe", vocab_size=300, byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # as LLaMA's
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    (tmp_path / "llama.model").write_bytes(buf.getvalue())
    t = data.Tokenizer(tmp_path / "llama.model", num_bins=16, max_images=2)
    n = t.sp.get_piece_size()
    specials = data.special_tokens(16, 2)
    assert [t.special_ids[s] for s in specials] == list(range(n, n + len(specials)))
    assert t.box_id == n and t.box_end_id == n + 1 and t.loc_start == n + 6
    assert t.vocab_size == n + len(specials) and t.pad_id == t.eos_id  # no pad piece: eos pads
    plain = t.sp.encode(" where is the tumor? ")
    assert t.encode("</Img2> where is the tumor? <box>") == [n + 5] + plain + [n]
    assert t.decode(data.prompt_chunks(t, 2)[2]) == "</Img2> where is the tumor? <box>"
    with pytest.raises(DataError, match="some of our special tokens"):
        data.Tokenizer.train(tmp_path / "ours.model", num_bins=8, max_images=2)
        data.Tokenizer(tmp_path / "ours.model", num_bins=16, max_images=2)


# -- batches and split -----------------------------------------------------------------------------

def _answers(tok, boxes, nbox):
    return data.answer_tokens(boxes, nbox, tok.num_bins, tok.loc_start, tok.box_end_id, tok.eos_id,
                              tok.pad_id)


def test_batch_tensors_shapes_and_masks(ds, tok):
    make, good = ds
    row = {**good, "box": [[0, 0, 4, 4], [0, 0, 40, 30], [10, 10, 20, 20]]}
    _, samples = data.read_summary(make(row))
    images, boxes, nbox, windows = data.load_tensors(samples, image_size=16, max_boxes=2)
    assert images.shape == (2, 2, 3, 16, 16) and images.dtype == torch.float16
    assert windows == [[0, 0, 40, 30]] * 2  # no crop: the whole image
    one, _ = data.load_images(samples[1], 16)
    torch.testing.assert_close(images[1].float(), one, atol=2e-3, rtol=0)
    assert nbox.tolist() == [1, 2]
    answer, mask = _answers(tok, boxes, nbox)
    assert answer.shape == (2, 10) and mask.shape == (2, 10)
    # row 1: box [10, 5, 30, 20] of 40x30 in 32 bins -> [8, 5, 24, 21]
    locs = [tok.loc_start + v for v in (8, 5, 24, 21)]
    assert answer[0].tolist() == locs + [tok.box_end_id, tok.eos_id] + [tok.pad_id] * 4
    assert mask[0].tolist() == [True] * 6 + [False] * 4
    # row 2: three boxes, the largest two kept, largest first
    assert data.parse_answer(tok, answer[1].tolist()) == [[0, 0, 31, 31], [8, 10, 16, 21]]
    assert mask[1].all()
    # the batched answers are exactly answer_ids of the bins of each sample's boxes
    for i, s in enumerate(samples):
        kept = sorted(s.boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)[:2]
        ids = data.answer_ids(tok, [data.box_to_bins(b, *s.size, tok.num_bins) for b in kept])
        assert answer[i][mask[i]].tolist() == ids


def test_augment_moves_boxes_with_the_pixels():
    # A bright rectangle on black in 2 modalities; after a random flip/zoom/shift/rotation, the
    # bright pixels' bounding box must match the transformed box to within a pixel or two.
    S = 64
    images = torch.zeros(8, 2, 3, S, S)
    boxes = torch.zeros(8, 1, 4)
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        x0, y0 = torch.randint(14, 30, (2,), generator=g).tolist()
        w, h = torch.randint(8, 20, (2,), generator=g).tolist()
        images[i, :, :, y0:y0 + h, x0:x0 + w] = 1.0
        boxes[i, 0] = torch.tensor([x0, y0, x0 + w, y0 + h]) / S
    aug = data.Augment(flip=0.5, scale=0.1, translate=0.1, rotate=0.0, contrast=0.0,
                       brightness=0.0, noise=0.0)
    x, b = aug(images, boxes, torch.Generator().manual_seed(1))
    assert x.shape == images.shape and b.shape == boxes.shape
    flipped = 0
    for i in range(8):
        ys, xs = torch.nonzero(x[i, 1, 0] > 0.5, as_tuple=True)
        seen = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
        assert (seen - b[i, 0] * S).abs().max() <= 1.5, (i, seen, b[i, 0] * S)
        assert torch.equal(x[i, 0], x[i, 1])  # one geometric transform for a study's modalities
        left = lambda box: int((box[0] + box[2]) / 2 < 0.5)  # the box's centre in the left half
        flipped += left(b[i, 0]) != left(boxes[i, 0])
    assert 0 < flipped < 8  # some studies mirrored, some not
    # with rotation the new box encloses the rotated rectangle: the bright pixels lie snugly inside
    aug = data.Augment(flip=0.5, rotate=10, contrast=0, brightness=0, noise=0)
    x, b = aug(images, boxes, torch.Generator().manual_seed(2))
    for i in range(8):
        ys, xs = torch.nonzero(x[i, 0, 0] > 0.5, as_tuple=True)
        seen = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
        d = (seen - b[i, 0] * S) * torch.tensor([1, 1, -1, -1])  # >= 0 when seen lies in the box
        assert d.min() >= -1.0 and d.max() <= 3.0, (i, seen, b[i, 0] * S)
    # no-op settings give back the input; so does any augmentation scaled to 0 without flips
    off = dict(scale=0, translate=0, rotate=0, contrast=0, brightness=0, noise=0)
    none = data.Augment(flip=0, **off)
    assert data.Augment(flip=0.0).scaled(0) == none
    assert data.Augment().scaled(2).rotate == 2 * data.Augment().rotate
    x, b = none(images, boxes)
    torch.testing.assert_close(x, images, atol=1e-5, rtol=0)
    torch.testing.assert_close(b, boxes, atol=1e-6, rtol=0)
    # a pure flip is exact
    x, b = data.Augment(flip=1, **off)(images, boxes)
    torch.testing.assert_close(x, images.flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(b[..., [0, 2]], 1 - boxes[..., [2, 0]], atol=1e-6, rtol=0)


def test_sample_from_images_and_score(ds, tmp_path):
    make, good = ds
    s = data.sample_from_images([tmp_path / "a_0.png", tmp_path / "a_1.png"])
    assert s.size == (40, 30) and s.boxes == [] and len(s.paths) == 2
    gray(tmp_path / "big.png", W=50)
    with pytest.raises(DataError, match="one size.*big.png 50x30"):
        data.sample_from_images([tmp_path / "a_0.png", tmp_path / "big.png"])
    with pytest.raises(DataError, match="not found.*nope.png"):
        data.sample_from_images([tmp_path / "nope.png"])
    _, samples = data.read_summary(make())          # one box [10, 5, 30, 20]
    half = [10, 5, 20, 20]                          # IoU 0.5 exactly
    sc = data.score_boxes([[10, 5, 30, 20], half], samples + samples)
    assert sc == dict(miou=0.75, acc50=1.0, acc75=0.5, sens=1.0)
    assert data.score_boxes([[30, 20, 40, 30]], samples[:1])["miou"] == 0.0  # no overlap
    # "no tumour" answers (None) and rows without a true box: IoU over rows with a box (a miss
    # scores 0), presence over all rows
    empty = data.Sample(samples[0].paths, [], samples[0].size, 9, {}, "x")
    answers = [[10, 5, 30, 20], None, None, [0, 0, 5, 5], None]
    sc = data.score_boxes(answers, samples * 2 + [empty] * 3)
    assert sc == dict(miou=0.5, acc50=0.5, acc75=0.5, sens=0.5, spec=2 / 3)
    assert data.score_line(sc) == ("mean IoU 0.500, acc@0.5 0.500, acc@0.75 0.500, "
                                   "presence sens 0.500 spec 0.667")


def test_case_id():
    assert data.case_id("/x/BraTS-GLI-00000-000_2_0.jpg") == "BraTS-GLI-00000-000"
    assert data.case_id("BraTS2015-pat0001_1_0-077_3.jpg") == "BraTS2015-pat0001_1"
    assert data.case_id("images/DEMO-00012-000_5_1.jpg") == "DEMO-00012-000"
    assert data.case_id("scan.png") == "scan"
    # other layouts: what a row's modality files share, less the slice number; else the folder
    tcga = "d/TCGA_CS_4941_19960909_12_flair.png", "d/TCGA_CS_4941_19960909_12_t1c.png"
    assert data.case_id(*tcga) == "TCGA_CS_4941_19960909"
    assert data.case_id("d/P7_slice-031_t1.png", "d/P7_slice-031_t2.png") == "P7_slice"
    assert data.case_id("pat9/12_flair.png", "pat9/12_t1c.png") == "pat9"


def test_case_key_wins(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    rows = [{"x_path": "a.png", "box": [1, 1, 4, 4], "patient": "P1"},
            {"x_path": "a.png", "box": [1, 1, 4, 4]}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, samples = data.read_summary(tmp_path / "s.jsonl")
    assert [s.case for s in samples] == ["P1", "a"]


def test_context_slices_one_whole_number_for_every_row(ds):
    """"context_slices" (how prepare.py brats made the pictures): absent is 0; a value must be a
    whole number in [0, MAX_CONTEXT] and the same on every row; else one line naming the line."""
    make, good = ds
    read = lambda *rows: data.context_slices(data.read_summary(make(*rows))[1], "s.jsonl")
    assert read(good) == 0
    one = dict(good, context_slices=1)
    assert data.context_slices(data.read_summary(write_rows(make().parent / "c.jsonl",
                                                            [one, one]))[1], "c.jsonl") == 1
    for bad in (1.0, -1, "1", True, data.MAX_CONTEXT + 1):
        with pytest.raises(data.DataError, match=r"^s.jsonl:2: \"context_slices\" "):
            read(dict(good, context_slices=bad))
    with pytest.raises(data.DataError, match=r"^s.jsonl:3: \"context_slices\" 1, but line 1 "
                                             r"says 0: the images of one dataset"):
        read(good, one)


def test_split_by_patient_never_splits_a_case():
    samples = [data.Sample([f"P{c}_{k}_0.jpg"], [], (1, 1), 0, {}, f"P{c}")
               for c in range(10) for k in range(5)]
    train, val = data.split_by_patient(samples, 0.3, seed=1)
    assert len(train) + len(val) == 50 and len(val) == 15
    assert not {s.case for s in train} & {s.case for s in val}
    assert data.split_by_patient(samples, 0.3, seed=1)[1] == val  # deterministic
    assert {s.case for s in data.split_by_patient(samples, 0.3, seed=2)[1]} != {s.case for s in val}
    assert len(data.split_by_patient(samples[:10], 0.1, 0)[1]) == 5  # 2 cases: one each side


def test_rotation_moves_boxes_near_the_corners_the_way_the_pixels_turn():
    """Far from the centre a rotation moves a box most: the box of the turned bright rectangle
    (seen) must be the answer's box. Turning the box the wrong way errs by about 7 px here, at 10
    degrees."""
    S = 128
    boxes = torch.tensor([[[0.06, 0.08, 0.30, 0.25]], [[0.70, 0.62, 0.94, 0.92]],
                          [[0.08, 0.70, 0.28, 0.93]]])
    images = torch.zeros(3, 1, 3, S, S)
    for i, (x0, y0, x1, y1) in enumerate((boxes[:, 0] * S).round().long().tolist()):
        images[i, :, :, y0:y1, x0:x1] = 1.0
    aug = data.Augment(flip=0.5, scale=0.1, translate=0, rotate=10, contrast=0, brightness=0,
                       noise=0)
    turned = 0
    for seed in range(4):
        x, b = aug(images, boxes, torch.Generator().manual_seed(seed))
        for i in range(3):
            ys, xs = torch.nonzero(x[i, 0, 0] > 0.5, as_tuple=True)
            seen = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            assert (seen - b[i, 0] * S).abs().max() <= 1.5, (seed, i, seen, b[i, 0] * S)
            turned += int((b[i, 0] - boxes[i, 0]).abs().max() * S > 4)
    assert turned >= 6  # the rotations were large enough to matter


def test_each_process_reads_its_own_samples():
    """Two processes at one step read disjoint samples, together the batch one process reads."""
    for step in (0, 3, 7):
        a = data.batch_indices(step, 4, 10, seed=1, rank=0, world=2)
        b = data.batch_indices(step, 4, 10, seed=1, rank=1, world=2)
        one = data.batch_indices(step, 8, 10, seed=1)
        assert sorted(a.tolist() + b.tolist()) == sorted(one.tolist())
        assert a.tolist() + b.tolist() == one.tolist()
    first_epoch = torch.cat([data.batch_indices(s, 5, 10, seed=1) for s in range(2)])
    assert sorted(first_epoch.tolist()) == list(range(10))  # an epoch visits every sample once
    again = data.batch_indices(5, 4, 10, seed=1)  # a resumed run at step 5
    assert torch.equal(data.batch_indices(5, 4, 10, seed=1), again)


def test_augmentation_differs_by_step_and_process_and_repeats_on_resume():
    images, boxes = torch.rand(2, 1, 3, 32, 32), torch.tensor([[[0.2, 0.2, 0.5, 0.6]]] * 2)
    aug = data.Augment()
    out = lambda step, rank=0: aug(images, boxes, data.step_generator(0, step, rank, world=2))[1]
    assert not torch.equal(out(0), out(1)) and not torch.equal(out(1), out(2))  # new every step
    assert not torch.equal(out(1, rank=0), out(1, rank=1))  # and on every process
    assert torch.equal(out(5), out(5))  # the same again when a resumed run redoes step 5


def test_12_bit_image_in_16_bits_reads_like_8_bits(tmp_path):
    """MRI exports store 12-bit values (0..4095) in 16-bit PNGs: scaled by the picture's own range,
    not by 65535 (which would read it nearly black), it reads like the same picture in 8 bits."""
    y, x = np.mgrid[0:40, 0:48]
    picture = x / 47 * 0.6 + ((x - 30) ** 2 + (y - 15) ** 2 < 64) * 0.4  # a ramp and a bright disc
    picture = picture / picture.max() * 4095  # 0..4095
    Image.fromarray(picture.round().astype(np.uint16)).save(tmp_path / "g12.png")
    Image.fromarray((picture / 4095 * 255).round().astype(np.uint8)).save(tmp_path / "g8.png")
    with Image.open(tmp_path / "g12.png") as im:
        assert im.mode == "I;16" and np.asarray(im).max() == 4095
    got, ref = data.load_image(tmp_path / "g12.png", 32), data.load_image(tmp_path / "g8.png", 32)
    torch.testing.assert_close(got, ref, atol=0.05, rtol=0)


def test_image_modes_read_right(tmp_path):
    """16- and 32-bit grey are scaled by their own range, so they read like the 8-bit picture;
    palette, RGBA and CMYK pictures read as their RGB."""
    ramp = np.tile(np.linspace(0, 255, 48).round().astype(np.uint8), (40, 1))  # 48 x 40, 0..255
    Image.fromarray(ramp).save(tmp_path / "g8.png")
    Image.fromarray(ramp.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # I;16, 0..65535
    Image.fromarray(ramp.astype(np.int32) * 1000 - 7).save(tmp_path / "g32.tif")  # I, any range
    Image.fromarray(ramp.astype(np.float32) / 255 * 3.5 + 1).save(tmp_path / "f32.tif")  # F
    ref = data.load_image(tmp_path / "g8.png", 32)
    for name in ("g16.png", "g32.tif", "f32.tif"):
        with Image.open(tmp_path / name) as im:
            assert im.mode in ("I;16", "I", "F"), im.mode
        torch.testing.assert_close(data.load_image(tmp_path / name, 32), ref, atol=0.05, rtol=0)
    rgb = np.stack([ramp, ramp[:, ::-1], np.full_like(ramp, 90)], -1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    Image.fromarray(ramp).convert("P").save(tmp_path / "pal.png")
    ref = data.load_image(tmp_path / "rgb.png", 32)
    torch.testing.assert_close(data.load_image(tmp_path / "rgba.png", 32), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(data.load_image(tmp_path / "cmyk.jpg", 32), ref, atol=0.1, rtol=0)
    grey = data.load_image(tmp_path / "g8.png", 32)
    torch.testing.assert_close(data.load_image(tmp_path / "pal.png", 32), grey, atol=0.05, rtol=0)
    Image.fromarray(np.zeros((5, 40), np.uint8)).save(tmp_path / "thin.png")
    with pytest.raises(DataError, match="thin.png: image of 40x5 pixels is too small"):
        data.load_image(tmp_path / "thin.png", 32)

"""End to end: train.py and sample.py as a user runs them (subprocesses, tiny sizes, CPU)."""

import gzip
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
import prepare
from model import MiniGPT
from test_prepare import write_nifti

ROOT = Path(__file__).resolve().parents[1]
# A tiny model: every size flag set, so the CPU recipe's sizes do not apply. A test overrides a flag
# by repeating it after TINY (argparse keeps the last).
TINY = ["--image-size", "32", "--patch-size", "8", "--vit-width", "32", "--vit-depth", "1",
        "--vit-heads", "2",
        "--num-query", "4", "--qformer-width", "32", "--qformer-depth", "1", "--qformer-heads", "2",
        "--dim", "32", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1", "--num-bins", "64",
        "--batch-size", "8", "--warmup-steps", "5", "--log-every", "5", "--device", "cpu",
        "--no-augment", "--box-head", "tokens"]


def run(script, *args, ok=True, env_extra=None, runner=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    cmd = (runner or [sys.executable]) + [str(ROOT / script), *map(str, args)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if ok and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small demo dataset: 3 patients x 2 slices."""
    d = tmp_path_factory.mktemp("demo")
    return prepare.make_demo(d, cases=3, slices_per_case=2, seed=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo):
    """A tiny model overfitted to the demo rows (validated on the same rows). One look: without
    augmentation, six rows' fixed zoomed views are learnt by heart, not the look (see
    test_second_look_in_training_and_sample_py)."""
    out = tmp_path_factory.mktemp("run")
    r = run("train.py", "--data", demo, "--val", demo, "--out", out, "--max-steps", 300,
            "--eval-every", 300, "--lr", "3e-3", "--no-second-look", *TINY)
    return out, r


def last_eval(out):
    return [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "miou" in m][-1]


def test_tiny_model_overfits_a_handful_of_samples(trained):
    out, r = trained
    m = last_eval(out)
    assert m["miou"] >= 0.9, r.stdout
    assert m["meanbox_miou"] < m["miou"]
    assert (out / "curves.png").exists() and (out / "ckpt" / "model.safetensors").exists()


def test_sample_answers_images_and_draws(trained, demo, tmp_path):
    out, _ = trained
    modalities, samples = data.read_summary(demo)
    s = samples[0]
    png = tmp_path / "answer.png"
    r = run("sample.py", "--ckpt", out, "--images", *s.paths, "--draw", png)
    answer = json.loads(r.stdout.strip().splitlines()[-1])
    assert answer["size"] == list(s.size)
    (maxx, maxy, minx, miny), = answer["box"]  # the training data's corner order
    assert maxx > minx and maxy > miny
    assert data.box_iou([minx, miny, maxx, maxy], s.boxes[0]) >= 0.8
    r = run("sample.py", "--ckpt", out, "--images", *s.paths, "--box-format", "xywh")
    (x, y, w, h), = json.loads(r.stdout.strip().splitlines()[-1])["box"]
    assert (x, y, w, h) == pytest.approx((minx, miny, maxx - minx, maxy - miny))
    with Image.open(png) as im:
        assert im.size == (s.size[0] * len(modalities), s.size[1] + 16)


def test_sample_batch_prediction_file(trained, demo, tmp_path):
    out, _ = trained
    pred = tmp_path / "pred.jsonl"
    r = run("sample.py", "--ckpt", out, "--data", demo, "--out", pred)
    rows_in = [json.loads(l) for l in Path(demo).read_text().splitlines() if l.strip()]
    rows_out = [json.loads(l) for l in pred.read_text().splitlines()]
    assert len(rows_out) == len(rows_in)
    for a, b in zip(rows_in, rows_out):
        assert ({k: v for k, v in a.items() if k.endswith("_path")}
                == {k: v for k, v in b.items() if k.endswith("_path")})
        assert len(b["box"]) == 1 and len(b["box"][0]) == 4
    assert "mean IoU" in r.stderr
    miou = float(r.stderr.split("mean IoU")[1].split(",")[0])
    assert miou >= 0.9  # the same rows the model overfitted
    # the recipe reads the demo's brains through a window (--crop head) and both answer in the
    # whole image's pixels: sample.py scores the rows as train.py's last evaluation did
    _, samples = data.read_summary(demo)
    assert all(data.load_images(s, 32, crop="head")[1] != [0, 0, *s.size] for s in samples)
    assert miou == pytest.approx(last_eval(out)["miou"], abs=2e-3)


def test_sample_reordered_keys_bf16_and_padded_batches(trained, demo, tmp_path):
    """A test file may list the modalities in another key order; bf16 weights answer as float32 does
    (up to a bin here and there); padding the last batch changes no answer."""
    out, _ = trained
    rows = [json.loads(l) for l in Path(demo).read_text().splitlines() if l.strip()]
    shuffled = tmp_path / "shuffled.jsonl"
    absolute = lambda k, v: str(Path(demo).parent / v) if k.endswith("_path") else v
    shuffled.write_text("".join(json.dumps({k: absolute(k, v) for k, v in reversed(r.items())})
                                + "\n" for r in rows))
    boxes = lambda r: [json.loads(l)["box"][0] for l in r.stdout.splitlines()]
    a = boxes(run("sample.py", "--ckpt", out, "--data", demo))
    assert len(a) == len(rows)
    # the images go in the model's order
    assert boxes(run("sample.py", "--ckpt", out, "--data", shuffled)) == a
    b = boxes(run("sample.py", "--ckpt", out, "--data", demo, "--bf16"))
    for x, y in zip(a, b):
        # two bins of the 128 px demo
        assert max(abs(u - v) for u, v in zip(x, y)) <= 2 * 128 / 64 + 1e-6
    import sample
    from model import load_checkpoint
    _, model, meta = load_checkpoint(out)
    _, samples = data.read_summary(demo)
    read = lambda s: data.load_images(s, meta["image_size"], meta["mean"], meta["std"],
                                      meta["crop"])[0]
    padded = sample.predict(model, samples, read, "cpu", batch_size=4, pad=True)
    for a, b in zip(padded, sample.predict(model, samples, read, "cpu")):
        assert torch.equal(a, b)


def test_rows_without_a_box_train_no_tumour_and_score_presence(trained, demo, tmp_path):
    rows = [json.loads(l) for l in Path(demo).read_text().splitlines() if l.strip()]
    rows[1]["box"] = []  # a slice without tumour
    f = Path(demo).parent / "one_empty.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run("train.py", "--data", f, "--val", f, "--out", tmp_path, "--max-steps", 2,
            "--eval-every", 2, *TINY)
    assert f'training: 1 of {len(rows)} rows without a tumour ("box": [])' in r.stdout
    assert "presence sens" in r.stdout and "spec" in last_eval(tmp_path)
    r = run("sample.py", "--ckpt", trained[0], "--data", f)
    answers = [json.loads(l) for l in r.stdout.splitlines()]
    # every row answered
    assert len(answers) == len(rows) and all(0 <= a["p_tumour"] <= 1 for a in answers)
    assert f"IoU on the {len(rows) - 1} rows with a box, presence on all {len(rows)}" in r.stderr
    empty = [r for r in rows if r["box"]]
    for r in empty:
        r["box"] = []
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run("train.py", "--data", f, "--out", tmp_path / "none", *TINY, ok=False)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f'error: {f}: no training rows with a box (every row says "box": [])']


def test_tumour_runs_bridge_gaps_and_drop_lone_slices():
    import sample
    # 10..22 with gaps of 1 (13), 4 (17-20): one run; 3 and 40 lone, far away: dropped; 29, 30 a
    # pair: dropped
    kept, bridged, dropped = sample.tumour_runs([40, 3, 10, 11, 12, 14, 15, 16, 21, 22, 29, 30])
    assert (kept == [10, 11, 12, 14, 15, 16, 21, 22] and bridged == [13, 17, 18, 19, 20]
            and dropped == [3, 29, 30, 40])
    # a gap of 5 splits: the longer part is the tumour, the other dropped, however long
    assert sample.tumour_runs([1, 2, 3, 9, 10, 11, 12]) == ([9, 10, 11, 12], [], [1, 2, 3])
    assert sample.tumour_runs([1, 2, 3, 6, 7], max_gap=1) == ([1, 2, 3], [], [6, 7])
    assert sample.tumour_runs([5]) == ([5], [], [])  # the only run is the longest, however short
    assert sample.tumour_runs([1, 2, 9, 10]) == ([1, 2], [], [9, 10])  # equals: the first
    assert sample.tumour_runs([]) == ([], [], [])


def test_extend_run_grows_the_ends_over_likely_neighbours_only():
    import sample
    # brain slices 0..20; the run 8..12 (with a bridged 10 absent from the list)
    p = {k: 0.05 for k in range(21)}
    p.update({6: 0.3, 7: 0.25, 13: 0.4, 14: 0.1, 15: 0.9, 3: 0.8})
    kept, added = sample.extend_run([8, 9, 11, 12], p, 0.2)
    assert added == [6, 7, 13] and kept == [6, 7, 8, 9, 11, 12, 13]  # stops at 5 (0.05), 14 (0.1)
    assert sample.extend_run([8, 9, 11, 12], p, 0.5) == ([8, 9, 11, 12], [])
    # never past the brain slices (the keys of p), however low the threshold
    assert sample.extend_run([19, 20], {19: 0.9, 20: 0.9, 18: 0.1}, 0.0) == ([18, 19, 20], [18])
    assert sample.extend_run([], p, 0.2) == ([], [])


def test_the_run_is_padded_by_millimetres_within_the_brain():
    """sample.MARGIN_MM = 2 mm at each end: 2 slices of 1 mm, 1 of 2 mm, none of 5 mm; never past
    the brain slices (p's keys), gaps in them included."""
    import sample
    p = {k: 0.05 for k in range(21)}
    assert sample.extend_run([8, 9, 11, 12], p, 0.0, 2) == ([6, 7, 8, 9, 11, 12, 13, 14],
                                                           [6, 7, 13, 14])
    assert sample.extend_run([8, 9, 11, 12], p, 0.0, 0) == ([8, 9, 11, 12], [])
    assert sample.extend_run([1, 2, 19, 20], p, 0.0, 3) == ([0, 1, 2, 19, 20], [0])
    del p[6]
    assert sample.extend_run([8, 9], p, 0.0, 3) == ([7, 8, 9, 10, 11, 12], [7, 10, 11, 12])
    assert sample.extend_run([], p, 0.0, 2) == ([], [])
    grid = lambda sizes: prepare.Grid((8, 8, 8), (0, 1, 2), (False,) * 3, np.diag([*sizes, 1.0]))
    assert sample.MARGIN_MM == 2.0
    assert sample.margin_slices(grid([1, 1, 1 + 1e-7]), "axial") == 2
    assert sample.margin_slices(grid([1, 1, 2]), "axial") == 1
    assert sample.margin_slices(grid([1, 1, 3]), "axial") == 0
    assert sample.margin_slices(grid([0.5, 0.5, 5]), "axial") == 0
    assert sample.margin_slices(grid([0.5, 0.5, 5]), "sagittal") == 4


def test_study_box_is_the_union_of_the_kept_slices():
    import sample
    shape = (100, 80, 30)  # RAS; axial slices are 100 wide (x reversed) and 80 high (y reversed)
    answers = {10: [20, 30, 40, 50], 11: [18.4, 32, 41, 49], 13: [25, 28.6, 38, 52],
               20: [0, 0, 99, 79]}
    box = sample.study_box(answers, [10, 11, 13], "axial", shape)
    assert box == [100 - 41, 80 - 52, 10, 100 - 18, 80 - 29, 14]
    # the width from slices 10 and 13 only, the depth from all three
    box = sample.study_box(answers, [10, 11, 13], "axial", shape, wide=[10, 13])
    assert box == [100 - 40, 80 - 52, 10, 100 - 20, 51, 14]  # 80 - 28.6 rounded


def test_wrong_image_count_is_a_clear_error(trained, demo):
    out, _ = trained
    _, samples = data.read_summary(demo)
    r = run("sample.py", "--ckpt", out, "--images", *samples[0].paths[:3], ok=False)
    assert r.returncode != 0
    assert "got 3 images" in r.stderr and "t2f Axial, t2w Axial, t1n Axial, t1c Axial" in r.stderr


def test_missing_checkpoint_is_a_clear_error(tmp_path, demo):
    _, samples = data.read_summary(demo)
    r = run("sample.py", "--ckpt", tmp_path / "nothing", "--images", *samples[0].paths, ok=False)
    assert r.returncode != 0 and "no checkpoint in" in r.stderr and "nothing" in r.stderr


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, demo):
    # Five good steps, then resume with a learning rate so large that the weights blow up at once.
    common = ["--data", demo, "--out", tmp_path, "--eval-every", 5, *TINY]
    run("train.py", *common, "--max-steps", 5)
    good = load_file(tmp_path / "ckpt" / "model.safetensors")
    r = run("train.py", *common, "--max-steps", 60, "--resume", "--lr", "1e30", ok=False)
    assert r.returncode != 0
    assert "loss became nan" in r.stderr and "the last good checkpoint (step 5) is kept" in r.stderr
    assert torch.load(tmp_path / "ckpt" / "train_state.pt", weights_only=False)["step"] == 5
    kept = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert all(torch.equal(kept[k], good[k]) for k in good)


@pytest.mark.parametrize("ema", [[], ["--ema", "0.9"]], ids=["plain", "ema"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, demo, ema):
    """With --ema the saved weights are the average, and the trained ones resume from
    train_state.pt: both must continue where the uninterrupted run went."""
    common = ["--data", demo, "--decay-steps", 20, "--eval-every", 10, *TINY, *ema]
    run("train.py", *common, "--out", tmp_path / "a", "--max-steps", 20)
    run("train.py", *common, "--out", tmp_path / "b", "--max-steps", 10)
    b10 = load_file(tmp_path / "b" / "ckpt" / "model.safetensors")
    r = run("train.py", *common, "--out", tmp_path / "b", "--max-steps", 20, "--resume")
    assert "resumed" in r.stdout and "at step 10" in r.stdout
    a = load_file(tmp_path / "a" / "ckpt" / "model.safetensors")
    b = load_file(tmp_path / "b" / "ckpt" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert any(not torch.equal(a[k], b10[k]) for k in a)  # the resumed steps did train


def test_ema_averages_the_trained_weights_and_copies_the_batchnorm_statistics():
    from model import update_ema
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2),
                                torch.nn.Linear(2, 1))
    model[2].requires_grad_(False)  # a frozen part: its average is never touched
    ema = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2),
                              torch.nn.Linear(2, 1))
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    model(torch.randn(8, 3))  # train mode: the BatchNorm statistics move
    update_ema(ema, model, decay=0.99, step=5)
    d = 6 / 15  # (1 + step) / (10 + step), below 0.99
    for k in ("0.weight", "0.bias", "1.weight", "1.bias"):
        want = d * before[k] + (1 - d) * model.state_dict()[k]
        torch.testing.assert_close(ema.state_dict()[k], want, rtol=0, atol=1e-7)
    for k in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(ema.state_dict()[k], model.state_dict()[k])
    assert torch.equal(ema[2].weight, before["2.weight"])
    update_ema(ema, model, decay=0.5, step=1000)  # late: the decay itself
    w = ema[0].weight.clone()
    update_ema(ema, model, decay=0.5, step=1000)
    torch.testing.assert_close(ema[0].weight, 0.5 * w + 0.5 * model[0].weight, rtol=0, atol=1e-7)


def test_cached_vit_features_train_like_the_vit(tmp_path, demo):
    """--cache-features runs a frozen ViT once per image: the run must end where the uncached one
    does."""
    common = ["--data", demo, "--max-steps", 6, "--eval-every", 6, *TINY, "--freeze-vit"]
    run("train.py", *common, "--out", tmp_path / "plain")
    r = run("train.py", *common, "--out", tmp_path / "cached", "--cache-features")
    assert "cached ViT features" in r.stdout
    a, b = (load_file(tmp_path / d / "ckpt" / "model.safetensors") for d in ("plain", "cached"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    r = run("train.py", *common, "--out", tmp_path / "bad", "--cache-features", "--augment",
            ok=False)
    assert r.returncode != 0 and "--no-augment" in r.stderr


def test_two_process_gloo_equals_one_process_with_the_whole_batch(tmp_path, demo):
    # A patch embedding, not the recipe's CNN stem: BatchNorm normalises by each process's own
    # share of the batch (no SyncBatchNorm), so with it two processes are not one in exact
    # arithmetic either, and the comparison below would measure rounding, not DDP.
    common = ["--data", demo, "--max-steps", 4, "--eval-every", 4, *TINY, "--grad-clip", 0,
              "--vit-stem", "patch"]
    run("train.py", *common, "--out", tmp_path / "one", "--batch-size", 8)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run("train.py", *common, "--out", tmp_path / "two", "--batch-size", 4, runner=torchrun)
    # Compare what the models compute, not raw parameters: a key bias has a zero gradient in exact
    # arithmetic (softmax ignores it), and Adam turns the rounding noise there into full-size steps.
    one, two = (MiniGPT.from_checkpoint(tmp_path / r / "ckpt").eval() for r in ("one", "two"))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 4, 3, 32, 32, generator=g)
    answer = one.cfg.loc_start + torch.randint(0, one.cfg.num_bins, (4, 6), generator=g)
    mask = torch.ones(4, 6, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(two(images, answer, mask), one(images, answer, mask),
                                   rtol=1e-4, atol=1e-5)
        h1, h2 = (m.llm(m.splice_images(m.encode_images(images)), torch.arange(m.prompt_len))
                  for m in (one, two))
        torch.testing.assert_close(h2, h1, rtol=1e-3, atol=1e-4)


def test_train_and_answer_with_pretrained_blip2_and_llama_folders(tmp_path, demo, tiny_blip2):
    """MiniGPT-4's shape end to end: --vision a BLIP-2 folder, --llm a LLaMA folder with its own
    sentencepiece tokenizer.model (our tokens appended after its vocabulary), Vicuna's template."""
    import io

    import sentencepiece as spm
    transformers = pytest.importorskip("transformers")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["where is the tumor? the brain scan shows it"] * 50),
        model_writer=buf, model_type="bpe", vocab_size=300, byte_fallback=True, unk_id=0,
        bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    torch.manual_seed(0)
    llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=sp.get_piece_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    llm.save_pretrained(tmp_path / "llm")
    (tmp_path / "llm" / "tokenizer.model").write_bytes(buf.getvalue())
    tiny_blip2(tmp_path / "blip2")
    out = tmp_path / "run"
    r = run("train.py", "--data", demo, "--out", out, "--vision", tmp_path / "blip2",
            "--llm", tmp_path / "llm", "--template", "vicuna", "--freeze-vit", "--freeze-qformer",
            "--lora-rank", 2, "--max-steps", 3, "--eval-every", 3, "--batch-size", 4,
            "--log-every", 1, "--device", "cpu", "--num-bins", 16)
    assert "4 slot(s) x 3 image tokens" in r.stdout
    config = json.loads((out / "ckpt" / "config.json").read_text())
    assert (config["vit"]["width"], config["vit"]["image_size"], config["qformer"]["width"],
            config["llm"]["dim"]) == (24, 16, 16, 32)
    assert config["llm"]["vocab_size"] == sp.get_piece_size() + len(data.special_tokens(16))
    assert config["meta"]["template"] == "vicuna" and config["lora_rank"] == 2
    tok = data.Tokenizer(out / "ckpt" / "tokenizer.model", 16)
    assert "###Human:" in tok.decode(config["prompt_chunks"][0])
    _, samples = data.read_summary(demo)
    answer = json.loads(run("sample.py", "--ckpt", out, "--images",
                            *samples[0].paths).stdout.strip().splitlines()[-1])
    assert len(answer["box"][0]) == 4 and answer["size"] == list(samples[0].size)


# -- a user's mistakes: one line that names the culprit, no traceback, nothing lost ---------------

def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _write_bytes(path, raw):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return path


def _copy_ckpt(trained, folder):
    """A copy of the trained run's checkpoint folder under folder/ckpt -> folder."""
    import shutil
    shutil.copytree(trained[0] / "ckpt", folder / "ckpt")
    return folder


def _bad_inputs(t, demo, trained):
    """(name, script, argv, words the one error line must hold, folder whose checkpoint must
    survive)."""
    rows = [json.loads(l) for l in Path(demo).read_text().splitlines() if l.strip()]
    img = rows[0]["t2f Axial_path"]
    d = Path(demo).parent
    line = lambda **change: json.dumps({**rows[0], **change})
    bad_jsonl = lambda name, *lines: _write(d / f"{name}.jsonl",
                                            "\n".join([json.dumps(rows[1]), *lines]) + "\n")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("L", (4, 4)).save(d / "tiny.png")
    data_argv = lambda f: ["--data", f, "--out", t / "o", *TINY]
    ckpt = lambda name: _copy_ckpt(trained, t / name)
    first = [str(d / p) for k, p in rows[0].items() if k.endswith("_path")]

    def damaged(name, damage):
        folder = ckpt(name)
        damage(folder / "ckpt")
        return folder

    def reshape(c):  # tensors of another shape than the config says
        cfg = json.loads((c / "config.json").read_text())
        cfg["llm"]["hidden_dim"] += 32
        (c / "config.json").write_text(json.dumps(cfg))

    return [
        ("no jsonl", "train.py", data_argv(d / "none.jsonl"), ["none.jsonl", "not found"], None),
        ("bad json", "train.py", data_argv(bad_jsonl("badjson", "{not json")),
         ["badjson.jsonl:2"], None),
        ("not an object", "train.py", data_argv(bad_jsonl("list", "[1, 2]")),
         ["list.jsonl:2"], None),
        ("no paths", "train.py", data_argv(bad_jsonl("nopath", '{"box": [[1, 2, 3, 4]]}')),
         ["nopath.jsonl:2"], None),
        ("other modalities", "train.py",
         data_argv(bad_jsonl("mods", json.dumps({"t1c Axial_path": img, "box": [[9, 9, 1, 1]]}))),
         ["mods.jsonl:2"], None),
        ("missing image", "train.py",
         data_argv(bad_jsonl("noimg", line(**{"t2f Axial_path": "gone.jpg"}))),
         ["noimg.jsonl:2", "gone.jpg"], None),
        ("corrupt image", "train.py",
         data_argv(bad_jsonl("corrupt", line(**{"t2f Axial_path": "corrupt.jpg"}))),
         ["corrupt.jsonl:2", "corrupt.jpg"], None),
        ("tiny image", "train.py",
         data_argv(bad_jsonl("tiny", line(**{"t2f Axial_path": "tiny.png"}))),
         ["tiny.jsonl:2", "too small"], None),
        ("flat box", "train.py", data_argv(bad_jsonl("flat", line(box=[[10, 10, 10, 20]]))),
         ["flat.jsonl:2"], None),
        ("nan box", "train.py", data_argv(bad_jsonl("nan", line(box=[[float("nan"), 1, 5, 5]]))),
         ["nan.jsonl:2"], None),
        ("text box", "train.py", data_argv(bad_jsonl("textbox", line(box=[["a", 1, 5, 5]]))),
         ["textbox.jsonl:2"], None),
        ("short box", "train.py", data_argv(bad_jsonl("short", line(box=[[1, 5, 5]]))),
         ["short.jsonl:2"], None),
        ("empty file", "train.py", data_argv(_write(d / "empty.jsonl", "\n")),
         ["empty.jsonl"], None),
        ("val modalities", "train.py",
         [*data_argv(demo), "--val",
          bad_jsonl("valmods", json.dumps({"t1c Axial_path": img, "box": [[9, 9, 1, 1]]}))],
         ["valmods.jsonl"], None),
        ("out is a file", "train.py", ["--data", demo, "--out", _write(t / "afile", "x"), *TINY],
         ["--out", "afile", "is a file"], None),
        ("existing checkpoint", "train.py", ["--data", demo, "--out", ckpt("keep"), *TINY],
         ["--resume", "--overwrite", "keep"], t / "keep"),
        ("resume with another size", "train.py",
         ["--data", demo, "--out", ckpt("resize"), "--resume", *TINY, "--dim", "64"],
         ["--dim 64", "(32)"], t / "resize"),
        ("resume and overwrite", "train.py",
         ["--data", demo, "--out", ckpt("both"), "--resume", "--overwrite", *TINY],
         ["--resume", "--overwrite"], t / "both"),
        ("resume nothing", "train.py", ["--data", demo, "--out", t / "fresh", "--resume", *TINY],
         ["--resume", "fresh"], None),
        ("resume damaged state", "train.py",
         ["--data", demo, "--resume", *TINY, "--out",
          damaged("state", lambda c: (c / "train_state.pt").write_bytes(b"junk"))],
         ["train_state.pt", "cannot be read"], t / "state"),
        ("cache without frozen vit", "train.py", [*data_argv(demo), "--cache-features"],
         ["--cache-features"], None),
        ("empty batches", "train.py", [*data_argv(demo), "--batch-size", "0"],
         ["--batch-size 0", ">= 1"], None),
        ("empty batches, the recipe", "train.py",
         ["--data", demo, "--out", t / "o", "--batch-size", "0"], ["--batch-size 0"], None),
        ("one bin", "train.py", [*data_argv(demo), "--num-bins", "1"],
         ["--num-bins 1", "between 2"], None),
        ("negative budget", "train.py", [*data_argv(demo), "--max-minutes", "-1"],
         ["--max-minutes -1"], None),
        ("nan lr", "train.py", [*data_argv(demo), "--lr", "nan"], ["--lr nan", "finite"], None),
        ("image not a multiple of the patch", "train.py",
         ["--data", demo, "--out", t / "o", "--image-size", "30", "--patch-size", "8"],
         ["--image-size 30", "--patch-size 8"], None),
        ("patch stem, image not a multiple", "train.py",
         [*data_argv(demo), "--vit-stem", "patch", "--image-size", "30"],
         ["--image-size 30"], None),
        ("random bytes as data", "train.py",
         data_argv(_write_bytes(d / "random.jsonl", bytes(range(256)) * 4)),
         ["random.jsonl"], None),
        ("resume a checkpoint without settings", "train.py",
         ["--data", demo, "--resume", *TINY, "--out",
          damaged("nosettings", lambda c: (c / "settings.json").unlink())],
         ["settings.json", "missing"], t / "nosettings"),
        ("resume settings of a newer version", "train.py",
         ["--data", demo, "--resume", *TINY, "--out",
          damaged("newer", lambda c: (c / "settings.json").write_text(
              json.dumps({"settings": {"warp_drive": 1}, "elapsed": 0.0})))],
         ["settings.json", "does not know", "warp_drive"], t / "newer"),
        ("resume broken settings", "train.py",
         ["--data", demo, "--resume", *TINY, "--out",
          damaged("badsettings", lambda c: (c / "settings.json").write_text("{"))],
         ["settings.json", "cannot be read"], t / "badsettings"),
        ("unknown flag value", "train.py", [*data_argv(demo), "--box-head", "circle"],
         ["--box-head", "circle"], None),
        ("truncated weights", "sample.py",
         ["--images", *first, "--ckpt",
          damaged("trunc", lambda c: (c / "model.safetensors").write_bytes(
              (c / "model.safetensors").read_bytes()[:100]))],
         ["model.safetensors"], t / "trunc"),
        ("no weights", "sample.py",
         ["--images", *first, "--ckpt",
          damaged("noweights", lambda c: (c / "model.safetensors").unlink())],
         ["no checkpoint in", "noweights"], t / "noweights"),
        ("broken config", "sample.py",
         ["--images", *first, "--ckpt",
          damaged("badcfg", lambda c: (c / "config.json").write_text("{"))],
         ["config.json"], t / "badcfg"),
        ("no config", "sample.py",
         ["--images", *first, "--ckpt",
          damaged("nocfg", lambda c: (c / "config.json").unlink())],
         ["no checkpoint in", "nocfg"], t / "nocfg"),
        ("resume without its tokenizer", "train.py",
         ["--data", demo, "--resume", *TINY, "--out",
          damaged("notok", lambda c: (c / "tokenizer.model").unlink())],
         ["tokenizer.model", "missing"], t / "notok"),
        ("tensors of another shape", "sample.py",
         ["--images", *first, "--ckpt", damaged("shape", reshape)],
         ["model.safetensors", "does not match"], t / "shape"),
        ("wrong image count", "sample.py", ["--ckpt", trained[0], "--images", *first[:2]],
         ["got 2 images"], None),
        ("missing image to answer", "sample.py",
         ["--ckpt", trained[0], "--images", *first[:3], str(d / "gone.png")],
         ["gone.png"], None),
        ("corrupt image to answer", "sample.py",
         ["--ckpt", trained[0], "--images", *first[:3], str(d / "corrupt.jpg")],
         ["corrupt.jpg"], None),
        ("bad rows to answer", "sample.py",
         ["--ckpt", trained[0], "--data", bad_jsonl("answerbad", "{oops")],
         ["answerbad.jsonl:2"], None),
        ("prepare without cases", "prepare.py", ["brats", t / "nowhere", t / "prep"],
         ["nowhere", "no case folders"], None),
    ]


def test_bad_inputs_give_one_clear_line_and_keep_checkpoints(trained, demo, tmp_path):
    cases = _bad_inputs(tmp_path, demo, trained)
    assert len(cases) >= 25
    for name, script, argv, words, keep in cases:
        before = {p: p.read_bytes() for p in sorted((keep / "ckpt").iterdir())} if keep else {}
        r = run(script, *argv, ok=False)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0, f"{name}: exit code 0\n{r.stdout}"
        assert "Traceback" not in r.stderr and len(lines) == 1, f"{name}: not one line:\n{r.stderr}"
        assert all(w in lines[0] for w in map(str, words)), f"{name}: {lines[0]!r} lacks {words}"
        if keep:
            after = {p: p.read_bytes() for p in sorted((keep / "ckpt").iterdir())}
            assert after == before, f"{name}: the checkpoint in {keep} changed"


def make_study(folder, shape=(48, 40, 16), mods=("t2f", "t1c"), seed=0):
    """A synthetic study folder <case>-{t2f,t1c,seg}.nii.gz, stored as BraTS stores it (x and y
    flipped against RAS): brain on slices 1..14 (0 and 15 show nothing), a bright tumour on slices
    5..10."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    X, Y, Z = shape
    x, y, z = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    brain = ((x - X / 2) / (0.42 * X)) ** 2 + ((y - Y / 2) / (0.45 * Y)) ** 2 < 1
    brain &= (z >= 1) & (z <= Z - 2)
    tumour = brain & (np.abs(x - 30) <= 5) & (np.abs(y - 24) <= 4) & (z >= 5) & (z <= 10)
    for k, m in enumerate(mods):
        v = (np.where(brain, rng.normal(100, 8, shape) + 20 * np.sin(x / 3 + k), 0)
             + (150 + 50 * k) * tumour)
        write_nifti(folder / f"{folder.name}-{m}.nii.gz", v.astype(np.float32)[::-1, ::-1].copy())
    write_nifti(folder / f"{folder.name}-seg.nii.gz", tumour.astype(np.uint8)[::-1, ::-1].copy())
    return [X - 36, Y - 29, 5, X - 25, Y - 20, 11]  # the tumour's box in the file's voxels (edges)


def box3_iou(a, b):
    """IoU of two 3-D boxes [x0, y0, z0, x1, y1, z1]."""
    inter = np.prod([max(0, min(a[i + 3], b[i + 3]) - max(a[i], b[i])) for i in range(3)])
    volume = lambda c: np.prod(np.subtract(c[3:], c[:3]))
    return inter / (volume(a) + volume(b) - inter)


def test_whole_study_end_to_end(tmp_path):
    """Convert a study with negatives, overfit a tiny model on its slices, answer the whole volume:
    its slices get the answers that the converted slices get (same pixels), the 3-D box finds the
    tumour, the picture is drawn; bad volumes give one line naming the file."""
    import sample
    src = tmp_path / "src"
    case = src / "BraTS-VOL-00000-000"
    truth = make_study(case)
    run("prepare.py", "brats", src, tmp_path / "data", "--min-tumor-px", 10, "--negatives", 1,
        "--val-fraction", 0)
    rows = Path(tmp_path / "data" / "summary.jsonl").read_text().splitlines()
    assert len(rows) == 12 and sum(json.loads(r)["box"] == [] for r in rows) == 6
    summary = tmp_path / "data" / "summary.jsonl"
    run("train.py", "--data", summary, "--val", summary, "--out", tmp_path / "run",
        "--max-steps", 300, "--eval-every", 300, "--lr", "3e-3", "--no-second-look",
        *TINY)  # as the README's whole-study command: --volume answers with one look
    m = last_eval(tmp_path / "run")
    assert m["sens"] == 1.0 and m["spec"] == 1.0 and m["miou"] >= 0.7

    png = tmp_path / "study.png"
    r = run("sample.py", "--ckpt", tmp_path / "run", "--volume", case, "--draw", png)
    *lines, summ = [json.loads(l) for l in r.stdout.splitlines()]
    assert (summ["study"] == str(case) and summ["view"] == "axial" and summ["slices"] == 16
            and summ["brain_slices"] == 14)
    # the tumour's slices 5..10, padded by the run's margin of 2 mm: 2 slices of 1 mm at each end
    assert sample.MARGIN_MM == 2.0 and summ["margin_slices"] == [3, 4, 11, 12]
    assert (summ["tumour_slices"] == 10 and summ["slice_range"] == [3, 12]
            and [l["slice"] for l in lines] == list(range(3, 13)))
    assert summ["dropped_slices"] == [] and summ["bridged_slices"] == []
    x0, y0, z0, x1, y1, z1 = summ["box_voxels"]
    assert (z0, z1) == (3, 13) and box3_iou([x0, y0, 5, x1, y1, 11], truth) >= 0.6, (x0, y0, truth)
    # identity affine with x and y flipped: millimetres are voxel edges less half a voxel, x and y
    # mirrored
    assert summ["box_mm"] == [-(x1 - 0.5), -(y1 - 0.5), z0 - 0.5, -(x0 - 0.5), -(y0 - 0.5),
                              z1 - 0.5]
    # each slice is the converter's picture: the volume's answers are the converted rows' answers
    r = run("sample.py", "--ckpt", tmp_path / "run", "--data", summary)
    by_slice = {int(json.loads(a)["t2f Axial_path"].split("-")[-1][:3]): json.loads(a)
                for a in r.stdout.splitlines()}
    for l in (l for l in lines if l["slice"] not in summ["margin_slices"]):
        # the file holds x and y reversed against RAS, the radiological picture reverses them
        # again: pixels are voxels
        (mx, my, nx, ny), = by_slice[l["slice"]]["box"]
        assert l["p_tumour"] == by_slice[l["slice"]]["p_tumour"]
        assert l["box_voxels"] == [round(nx), round(ny), l["slice"], round(mx), round(my),
                                   l["slice"] + 1]
    assert all(by_slice[k]["box"] == [] for k in by_slice if not 5 <= k <= 10)
    with Image.open(png) as im:
        assert im.size[0] == 4 * 160 and im.size[1] > 2 * 160

    # bad volumes: one line each, naming the file
    other = tmp_path / "other"
    other.mkdir()
    write_nifti(other / "short.nii.gz", np.ones((48, 40, 15), np.float32))
    write_nifti(other / "4d.nii.gz", np.ones((48, 40, 16, 2), np.float32))
    (other / "text.nii.gz").write_text("not a volume")
    (other / "BraTS-X").mkdir()
    (other / "BraTS-X" / "BraTS-X-t2f.nii.gz").symlink_to(case / f"{case.name}-t2f.nii.gz")
    t2f = case / f"{case.name}-t2f.nii.gz"
    for volume, message in [
            ([other / "BraTS-X"],
             f"error: {other / 'BraTS-X'}: no BraTS-X-t1c.nii.gz (the checkpoint reads t2f, t1c)"),
            ([t2f, other / "short.nii.gz"],
             f"error: volumes of one study must have one shape, got {t2f.name} (48, 40, 16), "
             "short.nii.gz (48, 40, 15)"),
            ([t2f, other / "4d.nii.gz"],
             f"error: {other / '4d.nii.gz'}: a 4-D image; expected one 3-D volume"),
            ([t2f, other / "text.nii.gz"],
             f"error: {other / 'text.nii.gz'}: cannot be read as a NIfTI file"),
            ([t2f], "error: got 1 volumes, but the checkpoint expects 2, one per modality in this "
                    "order: t2f, t1c")]:
        r = run("sample.py", "--ckpt", tmp_path / "run", "--volume", *volume, ok=False)
        assert (r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
                and r.stderr.startswith(message)), r.stderr
    r = run("sample.py", "--ckpt", tmp_path / "run", "--volume", case, "--data", summary, ok=False)
    assert r.stderr.strip() == "error: give one of --images, --data and --volume (see --help)"


def test_sample_without_input_answers_the_saved_validation_rows(tmp_path, demo):
    """The run folder keeps the validation rows it scored (val.jsonl, paths absolute, the patient
    under "case"): sample.py with no input answers the first of them, from any working folder."""
    out = tmp_path / "run"
    run("train.py", "--data", demo, "--out", out, "--max-steps", 2, "--eval-every", 2,
        "--val-fraction", "0.34", *TINY)
    _, samples = data.read_summary(demo)
    _, val = data.split_by_patient(samples, 0.34, 0)
    saved = [json.loads(l) for l in (out / "ckpt" / "val.jsonl").read_text().splitlines()]
    assert [r["case"] for r in saved] == [s.case for s in val]
    assert [[r[k] for k in r if k.endswith("_path")] for r in saved] == [s.paths for s in val]
    settings = json.loads((out / "ckpt" / "settings.json").read_text())["settings"]
    assert settings["val_fraction"] == 0.34 and settings["preset"] == "cpu"
    r = run("sample.py", "--ckpt", out)
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    assert len(rows) == min(4, len(val))
    assert [r["t2f Axial_path"] for r in rows] == [s.paths[0] for s in val[:4]]


def test_second_look_in_training_and_sample_py(demo, tmp_path):
    """The recipe's second look: train.py adds a zoomed view of every row with a box, scores
    its evaluation after the look (and logs the first look's), saves it in the checkpoint; and
    sample.py, answering the same rows, scores what train.py's last evaluation did."""
    out = tmp_path / "run"
    r = run("train.py", "--data", demo, "--val", demo, "--out", out, "--max-steps", 60,
            "--eval-every", 60, "--lr", "3e-3", *TINY)
    _, samples = data.read_summary(demo)
    log = r.stdout + r.stderr
    assert f"train ({2 * len(samples)}, 4, 3, 32, 32)" in log  # the whole views and the zoomed
    assert json.loads((out / "ckpt" / "config.json").read_text())["meta"]["second_look"]
    first = float(log.split("first look: mean IoU ")[-1].split(")")[0])
    m = last_eval(out)["miou"]
    assert first > 0.05 and abs(first - m) > 0.05  # boxes answered, and the look moved them
    r = run("sample.py", "--ckpt", out, "--data", demo)
    assert float(r.stderr.split("mean IoU")[1].split(",")[0]) == pytest.approx(m, abs=2e-3)


def test_second_look_answers_each_box_again_zoomed_around_it(tmp_path, monkeypatch):
    """sample.py with a --second-look checkpoint: a box answered on the first look is answered
    again through data.zoom_window around it, and that answer, mapped back through the window, is
    the row's box (p stays the first look's); a "no tumour" row is not looked at again."""
    import sample
    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray(rng.integers(0, 255, (60, 80), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    rows = [{"t2f Axial_path": "0.png", "box": [[20, 10, 40, 30]]},
            {"t2f Axial_path": "1.png", "box": []}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, samples = data.read_summary(tmp_path / "s.jsonl", require_boxes=False)
    meta = dict(modalities=["t2f Axial"], image_size=32, mean=[0.5] * 3, std=[0.5] * 3,
                box_format="corners", crop="none", second_look=True)
    calls = []

    def predict(model, items, load, device, batch_size=32, pad=False):
        calls.append([load(i) for i in items])
        if len(calls) == 1:  # the first look: a box on row 0, "no tumour" on row 1
            return torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]]), torch.tensor(
                [0.9, 0.2])
        assert items == [0]
        return torch.tensor([[0.25, 0.5, 0.75, 1.0]]), torch.tensor([0.1])
    monkeypatch.setattr(sample, "predict", predict)
    out, preds = sample.answer_samples(sample.Run(tmp_path, None, meta), samples, "cpu", False,
                                       "corners", True)
    first = [20.0, 15.0, 40.0, 30.0]  # [0.25, 0.25, 0.5, 0.5] of 80 x 60
    window = data.zoom_window(first, 80, 60)  # [10, 2, 40, 40]
    want, _ = data.load_zoomed(samples[0], first, 32, meta["mean"], meta["std"])
    assert len(calls) == 2 and torch.equal(calls[1][0], want)
    assert preds == [data.to_pixels([0.25, 0.5, 0.75, 1.0], window), None]
    assert preds[0] == [20.0, 22.0, 40.0, 42.0]
    assert out[0]["p_tumour"] == 0.9 and out[1]["box"] == []
    meta["second_look"] = False  # a checkpoint without it: one look
    calls.clear()
    assert sample.answer_samples(sample.Run(tmp_path, None, meta), samples, "cpu", False,
                                 "corners", True)[1] == [first, None]
    assert len(calls) == 1


# -- whole studies without a model: sample.py's checkpoint and model stubbed ---------------------

class _StubModel:
    """What sample.main does to a model before answering (predict is stubbed too)."""
    def to(self, *args):
        return self


def stub_model(monkeypatch, answer, prob=None, crop="none", margin_mm=0.0):
    """Replace sample.py's checkpoint and model with a two-modality axial "model" that answers RAS
    slice k with answer(k): a normalised box [x0, y0, x1, y1], or None for "no tumour"; p_tumour
    prob(k) (None: 1 with a box, else 0). The run's margin (sample.MARGIN_MM) is margin_mm: off
    unless a test asks for it, so that a run ends where the answers do."""
    import sample
    monkeypatch.setattr(sample, "MARGIN_MM", margin_mm)
    meta = dict(modalities=["t2f Axial", "t1c Axial"], image_size=32, mean=[0.5] * 3,
                std=[0.5] * 3, box_format="corners", crop=crop)
    run = sample.Run(Path("stub"), _StubModel(), meta)
    monkeypatch.setattr(sample, "load_checkpoint", lambda path: (run.folder, run.model, run.meta))

    def predict(model, items, load, device, batch_size=32, pad=False):
        for k in items:  # every slice read, as a model reads them (sample.py keeps their windows)
            assert load(k).shape == (2, 3, 32, 32)
        boxes = [answer(k) for k in items]
        return (torch.tensor([b or [0.0, 0.0, 1.0, 1.0] for b in boxes]),
                torch.tensor([prob(k) if prob else 1.0 if b else 0.0
                              for k, b in zip(items, boxes)]))
    monkeypatch.setattr(sample, "predict", predict)
    return run


def test_save_nifti_writes_the_boxes_on_the_studys_grid(tmp_path, monkeypatch):
    """--save-nifti: a label volume on the study's grid (the study's sform, qform and voxel sizes,
    byte for byte; read back, its affine), 1 in the 3-D box and 2 in each tumour slice's own box;
    its voxels > 0 span the summary's box_voxels. Only the brain's slices are answered."""
    import sample
    case = tmp_path / "BraTS-VOL-00000-000"
    truth = make_study(case)  # tumour on slices 5..10
    seg = prepare.read_nifti(case / f"{case.name}-seg.nii.gz") > 0
    X, Y, _ = seg.shape

    def answer(k):  # the true box, a narrower one on slice 7, a miss on slice 8 (bridged)
        img = prepare.view_slice(seg, "axial", k)
        if not img.any() or k == 8:
            return None
        ys, xs = np.nonzero(img)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1 - 2 * (k == 7), ys.max() + 1
        return [x0 / X, y0 / Y, x1 / X, y1 / Y]
    stub_model(monkeypatch, answer)
    labels, lines = tmp_path / "boxes.nii.gz", tmp_path / "lines.jsonl"
    sample.main(["--ckpt", str(tmp_path), "--volume", str(case), "--save-nifti", str(labels),
                 "--out", str(lines), "--device", "cpu"])
    *_, summary = [json.loads(l) for l in lines.read_text().splitlines()]
    assert summary["box_voxels"] == truth and summary["bridged_slices"] == [8]
    assert summary["brain_slices"] == 14  # slices 0 and 15 show nothing: not answered
    with gzip.open(case / f"{case.name}-t2f.nii.gz") as f:
        study = f.read(348)
    raw = gzip.decompress(labels.read_bytes())
    assert raw[252:344] == study[252:344] and raw[76:108] == study[76:108]
    assert struct.unpack("<8h", raw[40:56])[:4] == (3, 48, 40, 16)
    assert struct.unpack("<2h", raw[70:74]) == (2, 8)  # uint8
    stored = np.frombuffer(raw, np.uint8, 48 * 40 * 16, 352).reshape((48, 40, 16), order="F")
    assert set(np.unique(stored)) == {0, 1, 2}
    nz = np.nonzero(stored)
    assert [int(a.min()) for a in nz] + [int(a.max()) + 1 for a in nz] == summary["box_voxels"]
    x0, y0, z0, x1, y1, z1 = truth
    assert (stored[x0:x1, y0:y1, 8] == 1).all()  # bridged: the 3-D box only
    assert (stored[x0:x1, y0:y1, 9] == 2).all() and (stored[x0:x1, y0:y1, 7] == 1).sum() == 2 * 9
    study_grid = prepare.read_volume(case / f"{case.name}-t2f.nii.gz")[1]
    assert np.array_equal(prepare.read_volume(labels)[1].affine, study_grid.affine)


def test_unsure_slices_add_depth_not_width(tmp_path, monkeypatch):
    """The 3-D box's width comes from the slices answered with p >= BOX_AT; a kept slice answered
    less surely (here the run's end, slice 10, p 0.6, its box misplaced far to one side) adds its
    depth only: the box is the truth, the summary names the slice, and the label volume's slice box
    is cut at the 3-D box, so that its voxels > 0 still span box_voxels."""
    import sample
    case = tmp_path / "BraTS-VOL-00000-000"
    truth = make_study(case)  # tumour on slices 5..10
    seg = prepare.read_nifti(case / f"{case.name}-seg.nii.gz") > 0
    X, Y, _ = seg.shape

    def answer(k):
        img = prepare.view_slice(seg, "axial", k)
        if not img.any():
            return None
        if k == 10:
            return [0.0, 0.0, 0.3, 0.3]
        ys, xs = np.nonzero(img)
        return [xs.min() / X, ys.min() / Y, (xs.max() + 1) / X, (ys.max() + 1) / Y]
    stub_model(monkeypatch, answer, lambda k: 0.6 if k == 10 else 1.0 if answer(k) else 0.0)
    labels, lines = tmp_path / "boxes.nii.gz", tmp_path / "lines.jsonl"
    sample.main(["--ckpt", str(tmp_path), "--volume", str(case), "--save-nifti", str(labels),
                 "--out", str(lines), "--device", "cpu"])
    *answered, summary = [json.loads(l) for l in lines.read_text().splitlines()]
    assert 0.6 < sample.BOX_AT and [l["slice"] for l in answered] == list(range(5, 11))
    assert summary["box_voxels"] == truth and summary["depth_only_slices"] == [10]
    stored = np.frombuffer(gzip.decompress(labels.read_bytes()), np.uint8, 48 * 40 * 16,
                           352).reshape((48, 40, 16), order="F")  # the file's voxels
    nz = np.nonzero(stored)
    assert [int(a.min()) for a in nz] + [int(a.max()) + 1 for a in nz] == truth
    # before, the union of every kept slice's box: slice 10's box widened it to the image's corner
    study = sample.answer_study(sample.Run(*sample.load_checkpoint(tmp_path)), [str(case)],
                                None, "cpu")
    wide = sample.study_box(study.answers, study.kept, "axial", seg.shape)
    assert wide != study.box and wide[3] == X and wide[4] == Y


def test_the_margins_slices_add_depth_only(tmp_path, monkeypatch):
    """The run's margin (2 mm: two slices of 1 mm) adds depth and nothing else: its slices are
    flagged in the lines, have no box of their own in the label volume, and never set the width,
    even where no slice is sure (p < BOX_AT everywhere; the stub answers a "no tumour" slice with
    the whole image). An outlier the padded run reaches is the run's, not dropped."""
    import sample
    case = tmp_path / "BraTS-VOL-00000-000"
    make_study(case)  # brain on slices 1..14
    sure = {3, 4, 5, 6, 12}  # the run 3..6, an outlier 12 five slices past its end
    run = stub_model(monkeypatch, lambda k: [0.2, 0.2, 0.4, 0.4] if k in sure or 7 <= k <= 10
                     else None,
                     lambda k: 0.6 if k in sure else 0.35 if 7 <= k <= 10 else 0.0,
                     margin_mm=2.0)
    assert sample.tumour_runs(sorted(sure), 4) == ([3, 4, 5, 6], [], [12])
    study = sample.answer_study(run, [str(case)], None, "cpu")
    s = study.summary
    assert s["grown_slices"] == [7, 8, 9, 10] and s["margin_slices"] == [1, 2, 11, 12]
    assert s["slice_range"] == [1, 12] and s["dropped_slices"] == []
    assert [l["slice"] for l in study.lines if l["margin"]] == [1, 2, 11, 12]
    assert not any(l["outlier"] for l in study.lines)
    X, Y = study.images[0].shape[:2]
    assert study.box[0] > 0 and study.box[3] < X and study.box[1] > 0 and study.box[4] < Y
    assert s["depth_only_slices"] == [1, 2, 11, 12]
    labels = sample.box_labels(study)
    assert set(np.unique(labels[..., 1])) == {0, 1} and set(np.unique(labels[..., 12])) == {0, 1}
    assert 2 in labels[..., 5] and 2 in labels[..., 8]  # an answered and a grown slice


def test_volume_answers_map_back_from_each_slices_head_window(tmp_path, monkeypatch):
    """A --crop head model answers each slice in that slice's own window: a stub answering the
    whole window, [0, 0, 1, 1], on every slice gets back each slice's window in its pixels, read
    from the converter's pictures as data.head_window finds it."""
    import sample
    case = tmp_path / "BraTS-VOL-00000-000"
    make_study(case)
    stub_model(monkeypatch, lambda k: [0.0, 0.0, 1.0, 1.0], crop="head")
    run = sample.Run(*sample.load_checkpoint(tmp_path))
    study = sample.answer_study(run, [str(case)], None, "cpu")
    assert study.answers
    for k, box in study.answers.items():
        ims = [data.open_image(io.BytesIO(prepare.slice_image(v, "axial", k, 0)))
               for v in study.images]
        x0, y0, w, h = data.head_window(ims)
        assert box == [x0, y0, x0 + w, y0 + h], k
        assert [x0, y0, w, h] != [0, 0, *ims[0].size], k  # a window, not the whole slice


def test_save_nifti_needs_a_study_and_a_nifti_name():
    import sample
    for argv, message in [
            (["--save-nifti", "b.nii.gz"], "--save-nifti writes a whole study's boxes: give the "
                                           "study with --volume (see --help)"),
            (["--images", "a.jpg", "--save-nifti", "b.nii.gz"], "give the study with --volume"),
            (["--volume", "case", "--save-nifti", "boxes.png"],
             "--save-nifti boxes.png: expected a name ending in .nii.gz or .nii")]:
        with pytest.raises(SystemExit) as e:
            sample.get_args(argv)
        assert e.value.code.startswith("error: ") and message in e.value.code


def test_context_slices_travel_from_the_converter_to_the_whole_study_answer(tmp_path,
                                                                           monkeypatch):
    """prepare.py brats --context-slices 1 -> train.py records it in the checkpoint -> sample.py
    --volume reads each slice as the converter's RGB picture of slices k - 1, k, k + 1 (the same
    tensors as the converted rows'); pictures made another way are refused with one line."""
    import sample
    from model import load_checkpoint
    src = tmp_path / "src"
    case = src / "BraTS-VOL-00000-000"
    make_study(case)
    run("prepare.py", "brats", src, tmp_path / "data", "--min-tumor-px", 10, "--negatives", 1,
        "--val-fraction", 0, "--context-slices", 1)
    summary = tmp_path / "data" / "summary.jsonl"
    run("train.py", "--data", summary, "--val", summary, "--out", tmp_path / "run",
        "--max-steps", 1, "--eval-every", 1, *TINY)
    folder, model, meta = load_checkpoint(tmp_path / "run")
    assert meta["context_slices"] == 1
    seen = {}

    def predict(model, items, load, device, batch_size=32, pad=False):
        seen.update({k: load(k) for k in items})
        return torch.zeros(len(items), 4), torch.zeros(len(items))
    monkeypatch.setattr(sample, "predict", predict)
    sample.answer_study(sample.Run(folder, model, meta), [str(case)], None, "cpu")
    _, rows = data.read_summary(summary)
    for s in rows:
        k = int(Path(s.paths[0]).stem.split("-")[-1].split("_")[0])
        want, _ = data.load_images(s, 32, meta["mean"], meta["std"], meta["crop"])
        assert torch.equal(seen[k], want), k
        assert not torch.equal(seen[k][:, 0], seen[k][:, 1])  # the neighbours, not grey

    grey = tmp_path / "grey.jpg"
    Image.new("L", (40, 40)).save(grey)
    r = run("sample.py", "--ckpt", tmp_path / "run", "--images", grey, grey, ok=False)
    assert r.stderr.strip() == (f"error: {grey}: a grey image, but the checkpoint "
                                f"{tmp_path / 'run' / 'ckpt'} reads RGB pictures of slices k - 1, "
                                f"k, k + 1 (prepare.py brats --context-slices 1); answer the whole "
                                f"study with --volume")
    plain = tmp_path / "data" / "plain.jsonl"  # the same rows without the key
    plain.write_text("".join(json.dumps({k: v for k, v in json.loads(l).items()
                                         if k != "context_slices"}) + "\n"
                             for l in summary.read_text().splitlines()))
    r = run("sample.py", "--ckpt", tmp_path / "run", "--data", plain, ok=False)
    assert r.stderr.strip().startswith(f"error: {plain}: rows with \"context_slices\" 0, but the "
                                       f"checkpoint")


def test_training_and_validation_pictures_must_be_made_one_way(tmp_path):
    """--val rows whose "context_slices" differ from --data's: one line naming both files."""
    import train
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    row = {"t2f Axial_path": "a.png", "box": [[2, 2, 9, 9]], "case": "P1"}
    tr, va = tmp_path / "tr.jsonl", tmp_path / "va.jsonl"
    tr.write_text(json.dumps(dict(row, context_slices=1)) + "\n")
    va.write_text(json.dumps(row) + "\n")
    s = SimpleNamespace(data=str(tr), val=str(va), box_format="corners", val_fraction=0.2, seed=0)
    with pytest.raises(data.DataError, match=f"^{va}: \"context_slices\" 0 differs from {tr}'s 1$"):
        train.read_data(s, print)
    s.val = str(tr)
    assert train.read_data(s, print)[:2] == (["t2f Axial"], 1)


def test_gaps_are_bridged_in_millimetres(tmp_path, monkeypatch):
    """Up to sample.MAX_GAP_MM = 4 mm of "no tumour" slices is bridged: 4 slices of 1 mm, 2 of
    2 mm, none of 5 mm, from the spacing of the view's slices in the affine; through a study: a
    missed slice is bridged on 1 mm slices and splits the tumour on 5 mm ones."""
    import sample
    grid = lambda axes, sizes: prepare.Grid((8, 8, 8), axes, (False,) * 3,
                                            np.diag([*sizes, 1.0]))
    assert sample.gap_slices(grid((0, 1, 2), [1, 1, 1]), "axial") == 4
    assert sample.gap_slices(grid((0, 1, 2), [0.9375, 0.9375, 1 + 1e-7]), "axial") == 4
    assert sample.gap_slices(grid((0, 1, 2), [1, 1, 2]), "axial") == 2
    assert sample.gap_slices(grid((0, 1, 2), [0.5, 0.5, 5]), "axial") == 0
    assert sample.gap_slices(grid((0, 1, 2), [0.5, 0.5, 5]), "coronal") == 8
    stacked = prepare.Grid((8, 8, 8), (1, 2, 0), (False,) * 3,  # file axis 0: z, 5 mm apart
                           np.array([[0, 1, 0, 0], [0, 0, 1, 0], [5, 0, 0, 0], [0, 0, 0, 1.0]]))
    assert sample.gap_slices(stacked, "axial") == 0 and sample.gap_slices(stacked, "sagittal") == 4
    case = tmp_path / "1mm" / "BraTS-VOL-00000-000"
    make_study(case)
    thick = tmp_path / "5mm" / case.name
    thick.mkdir(parents=True)
    for f in case.iterdir():  # the same voxels, slices 5 mm apart
        stored = prepare.read_nifti(f)[::-1, ::-1].copy()
        write_nifti(thick / f.name, stored, rot=np.diag([-1.0, -1.0, 5.0]))
    run = stub_model(monkeypatch, lambda k: [0.2, 0.2, 0.4, 0.4] if k in (5, 6, 8, 9, 10) else None)
    one = sample.answer_study(run, [str(case)], None, "cpu").summary
    assert one["slice_range"] == [5, 10] and one["bridged_slices"] == [7]
    five = sample.answer_study(run, [str(thick)], None, "cpu").summary
    assert five["slice_range"] == [8, 10] and five["dropped_slices"] == [5, 6]
    assert five["box_mm"][2:6:3] == [5 * 7.5, 5 * 10.5]  # z edges of slices 8..10, 5 mm apart
    # the run's margin of 2 mm: two slices at each end of the 1 mm study, none of the 5 mm one
    run = stub_model(monkeypatch, lambda k: [0.2, 0.2, 0.4, 0.4] if k in (5, 6, 8, 9, 10) else None,
                     margin_mm=2.0)
    one = sample.answer_study(run, [str(case)], None, "cpu").summary
    assert one["slice_range"] == [3, 12] and one["margin_slices"] == [3, 4, 11, 12]
    five = sample.answer_study(run, [str(thick)], None, "cpu").summary
    assert five["slice_range"] == [8, 10] and five["margin_slices"] == []

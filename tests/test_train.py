"""End to end: train.py and sample.py as a user runs them (subprocesses, tiny sizes, CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
import prepare
from model import MiniGPT

ROOT = Path(__file__).resolve().parents[1]
# A tiny model: every size flag set, so the CPU recipe's sizes do not apply. A test overrides a flag by
# repeating it after TINY (argparse keeps the last).
TINY = ["--image-size", "32", "--patch-size", "8", "--vit-width", "32", "--vit-depth", "1", "--vit-heads", "2",
        "--num-query", "4", "--qformer-width", "32", "--qformer-depth", "1", "--qformer-heads", "2",
        "--dim", "32", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1", "--num-bins", "64",
        "--batch-size", "8", "--warmup-steps", "5", "--log-every", "5", "--device", "cpu", "--no-augment",
        "--box-head", "tokens"]


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
    """A tiny model overfitted to the demo rows (validated on the same rows)."""
    out = tmp_path_factory.mktemp("run")
    r = run("train.py", "--data", demo, "--val", demo, "--out", out, "--max-steps", 300, "--eval-every", 300,
            "--lr", "3e-3", *TINY)
    return out, r


def last_eval(out):
    return [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "miou" in m][-1]


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
        assert {k: v for k, v in a.items() if k.endswith("_path")} == {k: v for k, v in b.items() if k.endswith("_path")}
        assert len(b["box"]) == 1 and len(b["box"][0]) == 4
    assert "mean IoU" in r.stderr
    miou = float(r.stderr.split("mean IoU")[1].split(",")[0])
    assert miou >= 0.9  # the same rows the model overfitted


def test_sample_reordered_keys_bf16_and_padded_batches(trained, demo, tmp_path):
    """A test file may list the modalities in another key order; bf16 weights answer as float32 does
    (up to a bin here and there); padding the last batch changes no answer."""
    out, _ = trained
    rows = [json.loads(l) for l in Path(demo).read_text().splitlines() if l.strip()]
    shuffled = tmp_path / "shuffled.jsonl"
    absolute = lambda k, v: str(Path(demo).parent / v) if k.endswith("_path") else v
    shuffled.write_text("".join(json.dumps({k: absolute(k, v) for k, v in reversed(r.items())}) + "\n" for r in rows))
    boxes = lambda r: [json.loads(l)["box"][0] for l in r.stdout.splitlines()]
    a = boxes(run("sample.py", "--ckpt", out, "--data", demo))
    assert len(a) == len(rows)
    assert boxes(run("sample.py", "--ckpt", out, "--data", shuffled)) == a  # the images go in the model's order
    b = boxes(run("sample.py", "--ckpt", out, "--data", demo, "--bf16"))
    for x, y in zip(a, b):
        assert max(abs(u - v) for u, v in zip(x, y)) <= 2 * 128 / 64 + 1e-6  # two bins of the 128 px demo
    import sample
    model, meta, _ = sample.load(sample.find_checkpoint(out))
    _, samples = data.read_summary(demo)
    assert sample.predict(model, samples, meta, "cpu", batch_size=4, pad=True) == sample.predict(model, samples, meta, "cpu")


def test_rows_without_a_box_are_skipped_in_training_and_not_scored(trained, demo, tmp_path):
    rows = [json.loads(l) for l in Path(demo).read_text().splitlines() if l.strip()]
    rows[1]["box"] = []  # a slice without tumour
    f = Path(demo).parent / "one_empty.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run("train.py", "--data", f, "--val", f, "--out", tmp_path, "--max-steps", 2, "--eval-every", 2, *TINY)
    assert "1 rows without a box skipped (lines 2)" in r.stdout
    r = run("sample.py", "--ckpt", trained[0], "--data", f)
    assert len(r.stdout.splitlines()) == len(rows)  # every row answered
    assert f"on {len(rows) - 1} rows (1 rows without a box not scored)" in r.stderr


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


def test_resume_reproduces_the_uninterrupted_run(tmp_path, demo):
    common = ["--data", demo, "--decay-steps", 20, "--eval-every", 10, *TINY]
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


def test_cached_vit_features_train_like_the_vit(tmp_path, demo):
    """--cache-features runs a frozen ViT once per image: the run must end where the uncached one does."""
    common = ["--data", demo, "--max-steps", 6, "--eval-every", 6, *TINY, "--freeze-vit"]
    run("train.py", *common, "--out", tmp_path / "plain")
    r = run("train.py", *common, "--out", tmp_path / "cached", "--cache-features")
    assert "cached ViT features" in r.stdout
    a, b = (load_file(tmp_path / d / "ckpt" / "model.safetensors") for d in ("plain", "cached"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    r = run("train.py", *common, "--out", tmp_path / "bad", "--cache-features", "--augment", ok=False)
    assert r.returncode != 0 and "--no-augment" in r.stderr


def test_two_process_gloo_equals_one_process_with_the_whole_batch(tmp_path, demo):
    common = ["--data", demo, "--max-steps", 4, "--eval-every", 4, *TINY, "--grad-clip", 0]
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
        torch.testing.assert_close(two(images, answer, mask), one(images, answer, mask), rtol=1e-4, atol=1e-5)
        h1, h2 = (m.llm(m.splice_images(m.encode_images(images)), torch.arange(m.prompt_len)) for m in (one, two))
        torch.testing.assert_close(h2, h1, rtol=1e-3, atol=1e-4)


def test_train_and_answer_with_pretrained_blip2_and_llama_folders(tmp_path, demo, tiny_blip2):
    """MiniGPT-4's shape end to end: --vision a BLIP-2 folder, --llm a LLaMA folder with its own
    sentencepiece tokenizer.model (our tokens appended after its vocabulary), Vicuna's template."""
    import io

    import sentencepiece as spm
    transformers = pytest.importorskip("transformers")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["where is the tumor? the brain scan shows it"] * 50), model_writer=buf,
        model_type="bpe", vocab_size=300, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    torch.manual_seed(0)
    llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=sp.get_piece_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    llm.save_pretrained(tmp_path / "llm")
    (tmp_path / "llm" / "tokenizer.model").write_bytes(buf.getvalue())
    tiny_blip2(tmp_path / "blip2")
    out = tmp_path / "run"
    r = run("train.py", "--data", demo, "--out", out, "--vision", tmp_path / "blip2", "--llm", tmp_path / "llm",
            "--template", "vicuna", "--freeze-vit", "--freeze-qformer", "--lora-rank", 2, "--max-steps", 3,
            "--eval-every", 3, "--batch-size", 4, "--log-every", 1, "--device", "cpu", "--num-bins", 16)
    assert "4 slot(s) x 3 image tokens" in r.stdout
    config = json.loads((out / "ckpt" / "config.json").read_text())
    assert (config["vit"]["width"], config["vit"]["image_size"], config["qformer"]["width"], config["llm"]["dim"]) == (24, 16, 16, 32)
    assert config["llm"]["vocab_size"] == sp.get_piece_size() + len(data.special_tokens(16))
    assert config["meta"]["template"] == "vicuna" and config["lora_rank"] == 2
    tok = data.Tokenizer(out / "ckpt" / "tokenizer.model", 16)
    assert "###Human:" in tok.decode(config["prompt_chunks"][0])
    _, samples = data.read_summary(demo)
    answer = json.loads(run("sample.py", "--ckpt", out, "--images", *samples[0].paths).stdout.strip().splitlines()[-1])
    assert len(answer["box"][0]) == 4 and answer["size"] == list(samples[0].size)

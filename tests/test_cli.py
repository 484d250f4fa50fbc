"""The command line: data loading, train (every model writes every promised file, --resume,
bad data, DistributedDataParallel under torchrun), bench --quick, info."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import vae_ext
from vae_ext import data as vdata
from vae_ext.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.fixture(autouse=True)
def one_thread():
    """These tests check what the CLI does, not its speed: one intra-op thread keeps them fast
    and steady on a shared machine (where a busy core stalls every 2-thread parallel region
    for a scheduler tick)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])  # this checkout's vae_ext
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ----------------------------------------------------------------------------- data

def test_digits_shape_range_split():
    d = vdata.load_digits(val_fraction=0.1, seed=0)
    assert d.train.shape[1:] == (1, 8, 8) and d.val.shape[1:] == (1, 8, 8)
    assert len(d.train) + len(d.val) == 1797 and len(d.val) == 180
    assert d.train.dtype == torch.float32
    assert 0.0 <= float(d.train.min()) and float(d.train.max()) == 1.0
    again = vdata.load_digits(val_fraction=0.1, seed=0)
    torch.testing.assert_close(again.val, d.val)
    other = vdata.load_digits(val_fraction=0.1, seed=1)
    assert not torch.equal(other.val, d.val)


def test_pydoc_sentences_are_varied_english():
    sentences = vdata.pydoc_sentences()
    assert len(sentences) > 800
    assert len(set(sentences)) == len(sentences)
    lengths = [len(s.split()) for s in sentences]
    assert min(lengths) >= 3 and max(lengths) <= 32 and len(set(lengths)) > 20
    assert all(s[0].isupper() and s[-1] in ".!?" and s.isascii() for s in sentences)
    assert not any("::=" in s or ">>>" in s for s in sentences)


@pytest.mark.parametrize("level", ["char", "word"])
def test_tokenizer_roundtrip_and_specials(level):
    sentences = vdata.pydoc_sentences()[:300]
    tok = vdata.Tokenizer.build(sentences, level)
    assert tok.itos[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    for s in sentences[:50]:
        ids = tok.encode(s)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.unk_id not in ids
        expected = s if level == "char" else s.lower()
        if level == "char":
            assert tok.decode(ids) == expected
        else:  # spacing around punctuation is normalised; the words come back
            assert tok.decode(ids).split() and tok.tokenize(tok.decode(ids)) == tok.tokenize(expected)
    assert tok.encode("\x00zzqq\x01")[1] == tok.unk_id or level == "word"
    again = vdata.Tokenizer.from_state_dict(tok.state_dict())
    assert again.itos == tok.itos and again.level == level
    assert tok.decode([tok.bos_id, *tok.encode("a")[1:-1], tok.eos_id, 5, 6]) == tok.decode(tok.encode("a"))


def test_text_data_drops_long_sentences_and_pads_with_mask():
    sentences = ["Short one.", "A somewhat longer sentence here.", "Tiny.", "x" * 100 + "."]
    d = vdata.make_text_data(sentences, level="char", max_len=40, val_fraction=0.25, seed=0)
    assert d.dropped == 1 and len(d.train) + len(d.val) == 3
    assert all(len(t) <= 40 for t in d.train + d.val)
    tokens, mask = vdata.pad_collate(d.train + d.val, d.tokenizer.pad_id)
    lengths = [len(t) for t in d.train + d.val]
    assert tokens.shape == (3, max(lengths)) and mask.dtype == torch.bool
    for i, n in enumerate(lengths):
        assert not mask[i, :n].any() and mask[i, n:].all()
        assert (tokens[i, n:] == d.tokenizer.pad_id).all() and tokens[i, n - 1] == d.tokenizer.eos_id
    assert len(set(lengths)) > 1  # real padding


def test_text_file_and_image_folder_errors(tmp_path):
    with pytest.raises(vdata.DataError, match="does not exist"):
        vdata.load_text_file(str(tmp_path / "missing.txt"))
    with pytest.raises(vdata.DataError, match="is a folder"):
        vdata.load_text_file(str(tmp_path))
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(vdata.DataError, match="not a UTF-8 text file"):
        vdata.load_text_file(str(binary))
    empty = tmp_path / "e.txt"
    empty.write_text("\n  \n")
    with pytest.raises(vdata.DataError, match="no non-empty lines"):
        vdata.load_text_file(str(empty))
    good = tmp_path / "g.txt"
    good.write_text("First sentence.\n\n  Second one.  \n")
    assert vdata.load_text_file(str(good)) == ["First sentence.", "Second one."]

    with pytest.raises(vdata.DataError, match="does not exist"):
        vdata.load_image_folder(str(tmp_path / "nope"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    with pytest.raises(vdata.DataError, match="no images found"):
        vdata.load_image_folder(str(folder))
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(vdata.DataError, match="cannot read image .*broken.png"):
        vdata.load_image_folder(str(folder))


def _write_images(folder, n=6, size=(20, 14)):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr, "RGB").save(folder / f"img{i}.png")


def test_image_folder_loads_grey_and_rgb(tmp_path):
    _write_images(tmp_path / "a" / "nested", n=5)
    grey = vdata.load_image_folder(str(tmp_path / "a"), image_size=12, channels=1, val_fraction=0.2)
    assert grey.train.shape[1:] == (1, 12, 12) and len(grey.train) + len(grey.val) == 5
    assert 0.0 <= float(grey.train.min()) and float(grey.train.max()) <= 1.0
    rgb = vdata.load_image_folder(str(tmp_path / "a"), image_size=12, channels=3)
    assert rgb.train.shape[1:] == (3, 12, 12)


# ----------------------------------------------------------------------------- train

IMAGE_FILES = ("reconstruction.png", "samples.png", "interpolation.png", "loss_curves.png", "metrics.json",
               "checkpoint.pt")


def _check_png(path):
    from PIL import Image

    with Image.open(path) as img:
        assert img.size[0] > 50 and img.size[1] > 50


@pytest.mark.parametrize("model", ["conv", "mlp"])
def test_train_image_model_writes_every_file(tmp_path, model, capsys):
    out = tmp_path / model
    rc = main(["train", "--model", model, "--epochs", "1", "--limit", "256", "--batch-size", "64",
               "--out", str(out), "--seed", "3"])
    assert rc == 0
    for name in IMAGE_FILES:
        assert (out / name).is_file(), name
    for name in IMAGE_FILES[:4]:
        _check_png(out / name)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == model and metrics["data"] == "digits" and metrics["n_train"] == 256
    assert len(metrics["history"]) == 1 and metrics["history"][0]["steps"] == 4
    final = metrics["final"]
    for key in ("train_loss", "train_recon", "train_kl", "val_loss", "val_recon", "val_kl"):
        assert final[key] == final[key] and abs(final[key]) < 1e4, key  # finite
    assert metrics["timing"]["ms_per_step_median"] > 0 and metrics["world_size"] == 1
    assert set(metrics["ops"]) == {"masked_attention", "reparameterize", "elbo_loss"}
    printed = capsys.readouterr().out
    assert "epoch 1: train loss" in printed and str(out) in printed


def test_train_transformer_on_text_writes_sentences(tmp_path, capsys):
    out = tmp_path / "tf"
    rc = main(["train", "--model", "transformer", "--data", "text", "--epochs", "1", "--limit", "64",
               "--batch-size", "32", "--level", "word", "--max-len", "12", "--out", str(out)])
    assert rc == 0
    for name in ("text_samples.txt", "loss_curves.png", "metrics.json", "checkpoint.pt"):
        assert (out / name).is_file(), name
    text = (out / "text_samples.txt").read_text()
    assert "Samples" in text and "Reconstructions" in text and "Interpolation" in text
    assert text.count("  in:  ") >= 1 and text.count("t=") == 7
    printed = capsys.readouterr().out
    assert "Interpolation between two validation sentences" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "transformer" and metrics["history"][0]["steps"] == 2


def test_train_on_users_text_file_and_image_folder(tmp_path):
    sentences = tmp_path / "s.txt"
    sentences.write_text("\n".join(f"Sentence number {i} has {'some ' * (i % 5)}words." for i in range(40)))  # 6-10 words
    rc = main(["train", "--model", "transformer", "--data", str(sentences), "--level", "word", "--epochs", "1",
               "--batch-size", "16", "--max-len", "14", "--out", str(tmp_path / "t"), "--quiet"])
    assert rc == 0 and (tmp_path / "t" / "text_samples.txt").is_file()
    _write_images(tmp_path / "imgs", n=10)
    rc = main(["train", "--model", "conv", "--data", str(tmp_path / "imgs"), "--image-size", "16", "--epochs", "1",
               "--out", str(tmp_path / "i"), "--quiet"])
    assert rc == 0 and (tmp_path / "i" / "samples.png").is_file()
    metrics = json.loads((tmp_path / "i" / "metrics.json").read_text())
    assert metrics["data"] == "imgs"


def test_resume_continues_exactly(tmp_path):
    common = ["train", "--model", "conv", "--limit", "128", "--batch-size", "32", "--seed", "5", "--quiet"]
    assert main(common + ["--epochs", "2", "--out", str(tmp_path / "straight")]) == 0
    assert main(common + ["--epochs", "1", "--out", str(tmp_path / "split")]) == 0
    first = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert [h["epoch"] for h in first["history"]] == [1]
    assert main(["train", "--epochs", "2", "--out", str(tmp_path / "split"), "--resume", "--quiet"]) == 0
    resumed = json.loads((tmp_path / "split" / "metrics.json").read_text())
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["timing"]["steps"] == 4  # only the second epoch ran
    for key in ("train_loss", "val_loss", "val_kl"):
        assert resumed["history"][1][key] == pytest.approx(straight["history"][1][key], rel=1e-4), key
    ckpt = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 8


def test_resume_errors(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "missing.pt"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    torch.save({"hello": 1}, junk)
    assert main(["train", "--resume", str(junk), "--quiet"]) == 2
    assert "not a vae_ext training checkpoint" in capsys.readouterr().err


def test_bad_data_path_exits_2_with_message(tmp_path):
    missing = tmp_path / "no_such_data"
    r = subprocess.run([sys.executable, "-m", "vae_ext", "train", "--data", str(missing), "--quiet"],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "no such file or folder" in r.stderr and str(missing) in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "transformer", "--data", "digits"], "needs text"),
    (["--model", "conv", "--data", "text"], "need images"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
])
def test_bad_requests_exit_2(tmp_path, capsys, args, message):
    assert main(["train", *args, "--out", str(tmp_path), "--quiet"]) == 2
    assert message in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}"]
    cmd = torchrun + ["-m", "vae_ext"]
    cmd += ["train", "--model", "conv", "--epochs", "1", "--limit", "256", "--batch-size", "32",
            "--out", str(out), "--device", "cpu"]
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["history"][0]["steps"] == 4  # 256 samples / 2 ranks / 32 per batch
    assert "2 processes (DistributedDataParallel)" in r.stdout
    assert r.stdout.count("epoch 1: train loss") == 1  # rank 0 alone prints
    for name in IMAGE_FILES:
        assert (out / name).is_file(), name


# ----------------------------------------------------------------------------- bench, info

def test_bench_quick_writes_table_json_png(tmp_path, capsys):
    rc = main(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path), "--min-time", "0.01"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| op | case |" in printed
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["quick"] and result["torch"] == torch.__version__
    rows = result["results"]
    ops = {r["op"] for r in rows}
    assert ops == {"attention", "reparameterize", "elbo_loss"}
    impls = {(r["op"], r["impl"]) for r in rows}
    assert ("attention", "sdpa") in impls and ("attention", "reference") in impls
    assert ("reparameterize", "reference") in impls and ("elbo_loss", "reference") in impls
    if vae_ext.backend_info()["extension_loaded"]:
        assert ("reparameterize", "fused") in impls
    for r in rows:
        assert r["median_ms"] > 0 and (r["gbps"] or r["tflops"]) and r["pass"] in ("fwd", "fwd+bwd")
    assert result["ceilings"]["copy_gbps"] > 0
    _check_png(tmp_path / "bench.png")


def test_bench_attention_models_quick(tmp_path, capsys):
    """`vae-ext bench --ops attention_models`: the real-model families, fused vs SDPA, forward (and
    forward+backward at the training shapes); --quick keeps the small ones, in bfloat16."""
    from vae_ext import bench_shapes

    rc = main(["bench", "--quick", "--device", "cpu", "--ops", "attention_models", "--out", str(tmp_path),
               "--min-time", "0.01"])
    assert rc == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert {r["op"] for r in rows} == {"attention_models"}
    quick = [s for s in bench_shapes.MODEL_SHAPES if s.family not in bench_shapes.SLOW_ON_CPU]
    for shape in quick:
        mine = [r for r in rows if r["case"].startswith(shape.family + " ")]
        assert {(r["impl"], r["pass"]) for r in mine} >= {("fused", "fwd"), ("sdpa", "fwd")}, shape.family
        assert ("fused", "fwd+bwd") in {(r["impl"], r["pass"]) for r in mine} or shape.sq == 1
        assert all(r["tflops"] > 0 for r in mine)
    assert not any(r["case"].startswith(f) for r in rows for f in bench_shapes.SLOW_ON_CPU)


def test_info_text_and_json(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"vae_ext {vae_ext.__version__}" in text and "reparameterize" in text and "torch" in text
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["ops"]) == {"masked_attention", "reparameterize", "elbo_loss"}
    assert info["version"] == vae_ext.__version__


def test_installed_entry_point_and_module_agree():
    from vae_ext.__main__ import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) >= {"train", "bench", "info", "demo"}


def test_time_limit_stops_after_an_epoch(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["train", "--epochs", "50", "--limit", "64", "--time-limit", "0.001", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1]
    assert "time limit of 0.001 s reached after epoch 1 of 50" in capsys.readouterr().out


def test_demo_trains_and_compares_backends(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--epochs", "1", "--reference-steps", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("reconstruction.png", "samples.png", "interpolation.png", "loss_curves.png", "metrics.json"):
        assert (out / name).is_file() and name in printed
    assert "time per training step" in printed
    fused = [ln for ln in printed.splitlines() if ln.strip().startswith("fused vae_ext kernels")]
    ref = [ln for ln in printed.splitlines() if ln.strip().startswith("PyTorch reference ops")]
    assert len(fused) == 1 and len(ref) == 1 and "ms" in fused[0] and "x the speed" in ref[0]

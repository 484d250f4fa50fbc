"""`vae-ext reconstruct`: a checkpoint made here (diffusers folder and LDM single file), images
written side by side, PSNR and time printed per image, bad requests exit 2."""

import os
import re

import pytest
import torch

from vae_ext.__main__ import main
from vae_ext.models import AutoencoderKL
from vae_ext.reconstruct import psnr, read_image

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("safetensors")

SMALL = dict(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8, latent_channels=4,
             down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reconstruct")
    torch.manual_seed(0)
    model = AutoencoderKL(**SMALL)
    model.save_pretrained(root / "vae")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict_ldm().items()}, root / "vae-ldm.safetensors")
    g = torch.Generator().manual_seed(1)
    paths = []
    for name, (w, h) in (("a", (33, 20)), ("b", (16, 16))):
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        p = root / f"{name}.png"
        PIL.fromarray(arr).save(p)
        paths.append(str(p))
    return model, root, paths


def test_reconstruct_writes_side_by_side_and_prints_psnr(files, tmp_path, capsys):
    model, root, paths = files
    out = tmp_path / "out"
    assert main(["reconstruct", *paths, "--weights", str(root / "vae"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    lines = [l for l in text.splitlines() if "PSNR" in l]
    assert len(lines) == 3 and lines[-1].startswith("mean over 2 images")
    with PIL.open(out / "a.png") as img:
        assert img.size == (2 * 32, 20)  # 33x20 cropped to a multiple of 2, input | reconstruction
        side = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8).view(20, 64, 3)
    # the right half is the model's reconstruction, the left the input; the PSNR printed is theirs
    x = read_image(paths[0], 3, 2)
    with torch.no_grad():
        rec = ((model.decode(model.encode(x * 2 - 1).mode()) + 1) / 2).clamp(0, 1)
    right = side[:, 32:].permute(2, 0, 1).float() / 255
    assert (right - rec[0]).abs().max() <= 1 / 255 + 1e-6
    assert torch.equal(side[:, :32].permute(2, 0, 1), (x[0] * 255).round().to(torch.uint8))
    printed = float(re.search(r"PSNR\s+([\d.]+) dB", lines[0]).group(1))
    assert printed == pytest.approx(psnr(rec, x), abs=0.01)
    assert re.search(r"\d+\.\d ms", lines[0])


def test_reconstruct_single_file_and_tiles_match_folder(files, tmp_path, capsys):
    _, root, paths = files
    assert main(["reconstruct", paths[1], "--weights", str(root / "vae"), "--out", str(tmp_path / "a")]) == 0
    first = capsys.readouterr().out
    assert main(["reconstruct", paths[1], "--weights", str(root / "vae-ldm.safetensors"), "--preset", "sd1",
                 "--out", str(tmp_path / "b")]) == 2  # sd1 is not this small architecture
    assert "does not fit the model" in capsys.readouterr().err
    assert main(["reconstruct", paths[1], "--weights", str(root / "vae"), "--tile", "8",
                 "--out", str(tmp_path / "c")]) == 0
    tiled = capsys.readouterr().out
    assert "PSNR" in first and "PSNR" in tiled
    assert (tmp_path / "c" / "b.png").exists()


def test_reconstruct_bad_requests_exit_2(files, tmp_path, capsys):
    _, root, paths = files
    assert main(["reconstruct", paths[0], "--weights", str(root / "vae-ldm.safetensors")]) == 2
    assert "--preset" in capsys.readouterr().err
    assert main(["reconstruct", paths[0], "--weights", str(tmp_path / "none")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["reconstruct", str(tmp_path / "x.png"), "--weights", str(root / "vae")]) == 2
    assert "no such image" in capsys.readouterr().err
    (tmp_path / "bad.png").write_text("text")
    assert main(["reconstruct", str(tmp_path / "bad.png"), "--weights", str(root / "vae"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "not a readable image" in capsys.readouterr().err


def test_bench_sd_vae_quick(tmp_path, capsys):
    """`vae-ext bench --ops sd_vae`: the SD 1.x decode, fused vs reference vs diffusers."""
    pytest.importorskip("diffusers")
    import json

    assert main(["bench", "--quick", "--device", "cpu", "--ops", "sd_vae", "--out", str(tmp_path),
                 "--min-time", "0.01"]) == 0
    assert "sd_vae_decode" in capsys.readouterr().out
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    impls = {r["impl"] for r in rows if r["op"] == "sd_vae_decode"}
    assert impls == {"fused", "reference", "diffusers"}
    assert all(r["pass"] == "fwd" and r["median_ms"] > 0 for r in rows if r["op"] == "sd_vae_decode")

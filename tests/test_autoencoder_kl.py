"""AutoencoderKL (Stable Diffusion's VAE) against diffusers' AutoencoderKL: same weights, same numbers.

The oracle is diffusers itself (a test dependency, installed by `make test`): random-init diffusers
models in a small config and in the full SD 1.x config, saved with diffusers' save_pretrained and
loaded by ours; the LDM layout checked against diffusers' own LDM converter.
"""

import json
import os
import warnings

import pytest
import torch

import vae_ext
from conftest import requires_ext
from vae_ext import reference
from vae_ext.models import AUTOENCODER_KL_PRESETS, AutoencoderKL, CheckpointError
from vae_ext.models.autoencoder_kl_weights import diffusers_to_ldm, key_table, ldm_to_diffusers

diffusers = pytest.importorskip("diffusers", reason="diffusers is the oracle of these tests (pip install diffusers)")
pytest.importorskip("safetensors")
from safetensors.torch import save_file  # noqa: E402

SMALL = dict(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8, latent_channels=4,
             down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32)
F32 = dict(rtol=1e-5, atol=2e-5)


def _diffusers_model(cfg, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = diffusers.AutoencoderKL(**cfg).eval()
    # random init leaves biases and norms at 0/1: perturb every tensor so each key matters
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    ref = _diffusers_model(SMALL)
    folder = tmp_path_factory.mktemp("small")
    ref.save_pretrained(folder)
    return ref, AutoencoderKL.from_pretrained(folder), folder


def _images(n, size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _check_parity(ref, ours, x):
    with torch.no_grad():
        pr, po = ref.encode(x).latent_dist, ours.encode(x)
        torch.testing.assert_close(po.mean, pr.mean, **F32)
        torch.testing.assert_close(po.logvar, pr.logvar, **F32)
        z = pr.mean
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, **F32)
    return (po.mean - pr.mean).abs().max().item(), (ours.decode(z) - ref.decode(z).sample).abs().max().item()


# ---------------------------------------------------------------------------- parity

def test_small_config_from_pretrained_matches_diffusers(small_pair):
    ref, ours, _ = small_pair
    assert set(ours.state_dict()) == set(ref.state_dict())
    _check_parity(ref, ours, _images(2, 32))
    with torch.no_grad():
        x = _images(1, 24)  # not a multiple of the tile size, odd latent side after padding
        torch.testing.assert_close(ours(x), ref(x).sample, **F32)


@requires_ext
def test_mid_block_attention_runs_on_the_extension(small_pair, monkeypatch):
    """Backend 'extension' raises instead of falling back; the reference must never be called."""
    ref, ours, _ = small_pair

    def forbidden(*a, **k):
        raise AssertionError("the reference masked_attention ran")

    monkeypatch.setattr(reference, "masked_attention", forbidden)
    calls = []
    real = torch.ops.vae_ext.masked_attention_forward

    class Spy:
        def __call__(self, *args):
            calls.append(tuple(args[0].shape))
            return real(*args)

    from vae_ext.ops import attention as attention_ops

    monkeypatch.setattr(attention_ops, "_forward_op", lambda: Spy())  # the op the wrapper calls
    with vae_ext.use_backend("extension"):
        _check_parity(ref, ours, _images(2, 32))
    # encoder mid block at 16x16 and decoder mid block at 16x16: one head, head dim 64, 256 tokens
    assert (2, 1, 256, 64) in calls and len(calls) >= 2


@requires_ext
def test_attention_head_dim_512_on_the_cpu_kernel():
    """The SD mid block: one head, D = 512 channels, on the CPU kernel, against SDPA."""
    q, k, v = (torch.randn(1, 1, 64, 512) for _ in range(3))
    with vae_ext.use_backend("extension"):
        out = vae_ext.masked_attention(q, k, v)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), **F32)


@pytest.fixture(scope="module")
def sd1_files(tmp_path_factory):
    """The full SD 1.x config: a random-init diffusers model (weights rounded through float16, as
    most downloads are stored), saved as a diffusers folder and as an LDM-layout float16 file."""
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.AutoencoderKL(**AUTOENCODER_KL_PRESETS["sd1"]).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 1:  # biases and norms start at 0/1; the convs are random already
                p.add_(0.05 * torch.randn_like(p))
            p.copy_(p.half().float())
    root = tmp_path_factory.mktemp("sd1")
    ref.save_pretrained(root / "diffusers")
    ldm = diffusers_to_ldm(ref.state_dict(), dict(AUTOENCODER_KL_PRESETS["sd1"]))
    save_file({k: v.half().contiguous() for k, v in ldm.items()}, root / "sd15-vae.safetensors")
    return ref, root


def test_full_sd1_config_matches_diffusers(sd1_files):
    ref, root = sd1_files
    x = _images(1, 32)
    for ours in (AutoencoderKL.from_pretrained(root / "diffusers"),
                 AutoencoderKL.from_single_file(root / "sd15-vae.safetensors", preset="sd1")):
        assert ours.config["scaling_factor"] == 0.18215 and ours.dtype == torch.float32
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
        _check_parity(ref, ours, x)


def test_wrong_preset_names_file_and_keys(sd1_files):
    _, root = sd1_files
    with pytest.raises(CheckpointError, match=r"sd15-vae.safetensors.*unexpected.*quant_conv.*mis-shaped.*"
                                              r"encoder\.conv_out\.weight.*preset='sd3'"):
        AutoencoderKL.from_single_file(root / "sd15-vae.safetensors", preset="sd3")  # 16 latent channels


def test_save_pretrained_is_read_by_diffusers(small_pair, tmp_path):
    ref, ours, _ = small_pair
    ours.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["_class_name"] == "AutoencoderKL"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    _check_parity(again, ours, _images(1, 32))
    assert AutoencoderKL.from_pretrained(tmp_path).config == ours.config


def test_bin_weights_load(small_pair, tmp_path):
    ref, ours, _ = small_pair
    ours.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").exists()
    _check_parity(ref, AutoencoderKL.from_pretrained(tmp_path), _images(1, 32))


# ---------------------------------------------------------------------------- LDM layout

def test_key_table_matches_diffusers_ldm_converter(small_pair):
    """Our LDM keys, read by diffusers' own converter, give back diffusers' state dict exactly."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ref, ours, _ = small_pair
    ldm = diffusers_to_ldm(ours.state_dict(), ours.config)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    for key in ("decoder.up.0.block.1.conv1.weight", "decoder.up.1.upsample.conv.weight",
                "encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight"):
        assert key in ldm, key
    converted = convert_ldm_vae_checkpoint(dict(ldm), dict(ours.config))
    ours_sd = ours.state_dict()
    assert set(converted) == set(ours_sd)
    for k, v in converted.items():
        assert torch.equal(v.reshape(ours_sd[k].shape), ours_sd[k]), k
    back = ldm_to_diffusers(ldm, ours.config)  # and the same table read the other way
    assert all(torch.equal(back[k], v) for k, v in ours_sd.items())
    assert len({d for d, _, _ in key_table(ours.config)}) == len(ours_sd)


def test_from_single_file_standalone_and_whole_checkpoint(small_pair, tmp_path):
    ref, ours, _ = small_pair
    ldm = diffusers_to_ldm(ours.state_dict(), ours.config)
    cfg = dict(ours.config)
    standalone = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in ldm.items()}, standalone)
    _check_parity(ref, AutoencoderKL.from_single_file(standalone, config=cfg), _images(1, 32))
    # a whole SD checkpoint as a torch pickle: {"state_dict": {first_stage_model.*, model.diffusion_model.*}}
    whole = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    whole["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(4, 4)
    whole["first_stage_model.loss.logvar"] = torch.zeros(())
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": whole}, path)
    _check_parity(ref, AutoencoderKL.from_single_file(path, config=cfg), _images(1, 32))
    # a file already in diffusers' layout
    diff = tmp_path / "diffusers_layout.safetensors"
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, diff)
    _check_parity(ref, AutoencoderKL.from_single_file(diff, config=cfg), _images(1, 32))


# ---------------------------------------------------------------------------- bad checkpoints

def test_bad_checkpoints_raise_naming_file_and_keys(small_pair, tmp_path):
    ref, ours, folder = small_pair
    cfg = dict(ours.config)
    ldm = {k: v.contiguous() for k, v in diffusers_to_ldm(ours.state_dict(), ours.config).items()}

    missing = dict(ldm)
    del missing["encoder.mid.attn_1.q.weight"]
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"missing.safetensors.*1 missing key.*encoder\.mid\.attn_1\.q\.weight"):
        AutoencoderKL.from_single_file(tmp_path / "missing.safetensors", config=cfg)

    extra = dict(ldm, **{"encoder.mid.attn_2.q.weight": torch.zeros(1)})
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected key.*encoder\.mid\.attn_2\.q\.weight"):
        AutoencoderKL.from_single_file(tmp_path / "extra.safetensors", config=cfg)

    shaped = dict(ldm, **{"decoder.conv_out.weight": torch.zeros(3, 32, 1, 1)})
    save_file(shaped, tmp_path / "shaped.safetensors")
    with pytest.raises(CheckpointError, match=r"mis-shaped.*decoder\.conv_out\.weight \(file \(3, 32, 1, 1\)"):
        AutoencoderKL.from_single_file(tmp_path / "shaped.safetensors", config=cfg)

    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes.txt is neither a safetensors file nor a torch checkpoint"):
        AutoencoderKL.from_single_file(tmp_path / "notes.txt", config=cfg)
    torch.save({"a": 1}, tmp_path / "dict.pt")
    with pytest.raises(CheckpointError, match=r"dict.pt does not hold a state dict"):
        AutoencoderKL.from_single_file(tmp_path / "dict.pt", config=cfg)
    with pytest.raises(CheckpointError, match="no such file"):
        AutoencoderKL.from_single_file(tmp_path / "absent.safetensors", preset="sd1")
    with pytest.raises(ValueError, match="preset must be one of"):
        AutoencoderKL.from_single_file(tmp_path / "extra.safetensors", preset="sd9")
    with pytest.raises(ValueError, match="preset .* or config, exactly one"):
        AutoencoderKL.from_single_file(tmp_path / "extra.safetensors")

    # a diffusers folder whose config does not fit its weights
    bad = tmp_path / "folder"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(dict(cfg, latent_channels=8)))
    os.link(folder / "diffusion_pytorch_model.safetensors", bad / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"folder/diffusion_pytorch_model.safetensors.*mis-shaped"):
        AutoencoderKL.from_pretrained(bad)
    with pytest.raises(CheckpointError, match="has no config.json"):
        AutoencoderKL.from_pretrained(tmp_path)


def test_bad_config_and_inputs(small_pair):
    _, ours, _ = small_pair
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderKL(**dict(SMALL, norm_num_groups=7))
    with pytest.raises(ValueError, match="down_block_types"):
        AutoencoderKL(**dict(SMALL, down_block_types=["DownEncoderBlock2D"]))
    with pytest.raises(ValueError, match="act_fn"):
        AutoencoderKL(**dict(SMALL, act_fn="tanh"))
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3, H, W\)"):
        ours.encode(torch.randn(1, 4, 8, 8))
    with pytest.raises(TypeError, match="z must be a floating tensor"):
        ours.decode(torch.zeros(1, 4, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="z has dtype torch.float64, the model torch.float32"):
        ours.decode(torch.zeros(1, 4, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="z is empty"):
        ours.decode(torch.zeros(0, 4, 4, 4))
    with pytest.raises(ValueError, match="tile_sample_size must be a multiple of 2"):
        AutoencoderKL(**SMALL).enable_tiling(tile_sample_size=15)


# ---------------------------------------------------------------------------- sampling

def test_seeded_sample_reproduces_diffusers(small_pair):
    ref, ours, _ = small_pair
    x = _images(3, 32)
    with torch.no_grad():
        pr, po = ref.encode(x).latent_dist, ours.encode(x)
    for seed in (0, 7):
        a = pr.sample(torch.Generator().manual_seed(seed))
        b = po.sample(torch.Generator().manual_seed(seed))
        torch.testing.assert_close(b, a, **F32)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    torch.testing.assert_close(po.sample(gens()), pr.sample(gens()), **F32)
    torch.manual_seed(5)
    a = pr.sample()
    torch.manual_seed(5)
    torch.testing.assert_close(po.sample(), a, **F32)
    # the kernel's Philox stream is another stream: the default DiagonalGaussian does not match
    philox = vae_ext.nn.DiagonalGaussian.from_mean_logvar(po.mean, po.logvar)
    assert not torch.allclose(philox.sample(torch.Generator().manual_seed(0)),
                              pr.sample(torch.Generator().manual_seed(0)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a CUDA generator")
def test_seeded_sample_reproduces_diffusers_cuda(small_pair):
    ref, ours, _ = small_pair
    ref, ours = ref.cuda(), AutoencoderKL.from_config(ours.config).cuda()
    ours.load_state_dict(ref.state_dict())
    x = _images(2, 32).cuda()
    with torch.no_grad():
        a = ref.encode(x).latent_dist.sample(torch.Generator("cuda").manual_seed(0))
        b = ours.encode(x).sample(torch.Generator("cuda").manual_seed(0))
    torch.testing.assert_close(b, a, **F32)


def test_loss_is_gaussian_elbo_with_small_beta(small_pair):
    _, ours, _ = small_pair
    x = _images(2, 32)
    out = ours.loss(x, beta=1e-6, generator=torch.Generator().manual_seed(0))
    sse = ((out.x_hat - x) ** 2).flatten(1).sum(1)
    kl = 0.5 * (out.mu ** 2 + out.logvar.exp() - 1 - out.logvar).flatten(1).sum(1)
    torch.testing.assert_close(out.recon, sse.mean(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.kl, kl.mean(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.loss, (sse + 1e-6 * kl).mean(), rtol=1e-5, atol=1e-4)
    out.loss.backward()
    assert ours.encoder.mid_block.attentions[0].to_q.weight.grad.abs().sum() > 0
    ours.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------- slicing, tiling

def test_slicing_matches_batched(small_pair):
    _, ours, _ = small_pair
    x = _images(3, 32)
    with torch.no_grad():
        full_m, full_d = ours.encode(x).mean, ours.decode(torch.randn(3, 4, 8, 8, generator=torch.Generator()))
        ours.enable_slicing()
        try:
            sl_m = ours.encode(x).mean
            sl_d = ours.decode(torch.randn(3, 4, 8, 8, generator=torch.Generator()))
        finally:
            ours.disable_slicing()
    torch.testing.assert_close(sl_m, full_m, **F32)
    torch.testing.assert_close(sl_d, full_d, **F32)


def test_tiled_decode_and_encode_match_diffusers_tiling(small_pair):
    ref, ours, _ = small_pair
    z = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(0))
    x = _images(1, 80)
    ref.enable_tiling()
    ours.enable_tiling()
    try:
        with torch.no_grad():
            torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, **F32)
            torch.testing.assert_close(ours.encode(x).mean, ref.encode(x).latent_dist.mean, **F32)
    finally:
        ref.disable_tiling()
        ours.disable_tiling()


def test_tiled_decode_against_untiled(small_pair):
    """Tiles see only their own part of the latent (3x3 convs, GroupNorm statistics, attention),
    so tiled and untiled differ by a bounded amount; the blend zones are where tiles meet."""
    _, ours, _ = small_pair
    z = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = ours.decode(z)
        ours.enable_tiling(tile_sample_size=32, tile_overlap_factor=0.25)
        try:
            tiled = ours.decode(z)
        finally:
            ours.disable_tiling()
    assert tiled.shape == full.shape == (1, 3, 80, 80)
    assert torch.isfinite(tiled).all()
    scale = full.abs().max().item()
    # tile stride 24 px, blend zones 8 px wide at the start of every tile after the first
    blend = torch.zeros(80, dtype=torch.bool)
    for start in range(24, 80, 24):
        blend[start:start + 8] = True
    zone = blend[:, None] | blend[None, :]
    err = (tiled - full).abs()[0].amax(0)
    # stated tolerances (measured: away 0.05 mean / 0.25 max, blend zones 0.09 / 0.32, of max |untiled|)
    assert err[~zone].mean() <= 0.08 * scale and err[~zone].max() <= 0.35 * scale
    assert err[zone].mean() <= 0.13 * scale and err[zone].max() <= 0.45 * scale


def test_tiled_decode_of_a_large_latent_bounded(small_pair):
    """A 2048-pixel-equivalent side for the small model (f = 2): 128-px tiles, finite output."""
    _, ours, _ = small_pair
    ours.enable_tiling(tile_sample_size=64)
    try:
        with torch.no_grad():
            out = ours.decode(torch.randn(1, 4, 96, 96))
    finally:
        ours.disable_tiling()
    assert out.shape == (1, 3, 192, 192) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------- dtypes, latents, presets

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_decode_close_to_float32(small_pair, dtype):
    ref, ours, _ = small_pair
    low = AutoencoderKL.from_config(dict(ours.config, force_upcast=False))
    low.load_state_dict(ours.state_dict())
    low = low.to(dtype).eval()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.decode(z).sample
        got = low.decode(z.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)


def test_force_upcast_float16_keeps_nan_out(small_pair):
    """Activations above float16's range (SDXL's VAE has them): NaN without the upcast, none with it."""
    _, ours, _ = small_pair
    models = {}
    for upcast in (True, False):
        m = AutoencoderKL.from_config(dict(ours.config, force_upcast=upcast))
        m.load_state_dict(ours.state_dict())
        with torch.no_grad():
            m.decoder.conv_in.weight.mul_(3e4)
        models[upcast] = m.half().eval()
    z = torch.randn(1, 4, 8, 8).half()
    with torch.no_grad():
        fine = models[True].decode(z)
        broken = models[False].decode(z)
    assert fine.dtype == torch.float16 and torch.isfinite(fine).all()
    assert not torch.isfinite(broken).all()
    assert models[True].dtype == torch.float16  # the weights went back to float16


def test_scale_latents_per_preset():
    for name, want_scale, want_shift in (("sd1", 0.18215, 0.0), ("sdxl", 0.13025, 0.0), ("sd3", 1.5305, 0.0609),
                                         ("flux", 0.3611, 0.1159)):
        cfg = AUTOENCODER_KL_PRESETS[name]
        model = AutoencoderKL(**dict(cfg, block_out_channels=[32], down_block_types=cfg["down_block_types"][:1],
                                     up_block_types=cfg["up_block_types"][:1]))
        z = torch.randn(1, cfg["latent_channels"], 4, 4)
        torch.testing.assert_close(model.scale_latents(z), (z - want_shift) * want_scale)
        torch.testing.assert_close(model.unscale_latents(model.scale_latents(z)), z)
        assert (model.quant_conv is None) == (name in ("sd3", "flux"))
    m = AutoencoderKL(**dict(SMALL, latents_mean=[0.1, 0.2, 0.3, 0.4], latents_std=[1.0, 2.0, 3.0, 4.0]))
    z = torch.randn(1, 4, 2, 2)
    mean, std = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, 4, 1, 1), torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    torch.testing.assert_close(m.scale_latents(z), (z - mean) * 0.18215 / std)
    torch.testing.assert_close(m.unscale_latents(m.scale_latents(z)), z)


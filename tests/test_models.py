"""vae_ext.models: the three models train (loss falls) in every mode, encode/decode/sample,
padding, decoding, state_dict, backends, torch.compile, autocast, DistributedDataParallel,
and bad input."""

import io
import os
import socket
import subprocess
import sys

import pytest
import torch

import vae_ext
from conftest import requires_cuda
from vae_ext.models import VAE, ConvVAE, TransformerVAE, VAEOutput
from vae_ext.nn import DiagonalGaussian

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(n, size=8, seed=0):
    """Blurry binary-ish blobs in [0, 1]: structured enough for a few steps to lower the loss."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, size // 2, size // 2, generator=g)
    return torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def _tokens(n=8, length=10, vocab=16, seed=0):
    """[bos, w..., eos, pad...] with varying lengths."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(3, vocab, (n, length), generator=g)
    tok[:, 0] = 1
    for i in range(n):
        end = 3 + (i % (length - 3))
        tok[i, end] = 2
        tok[i, end + 1:] = 0
    return tok


def _tiny_tvae(**kw):
    args = dict(vocab_size=16, d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64,
                latent_dim=8, max_len=16, dropout=0.0)
    args.update(kw)
    return TransformerVAE(**args)


def _train(model, data, steps, lr=1e-2):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = model(data)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


# ---------------------------------------------------------------- training: the loss falls

MODEL_CASES = {
    "vae-mlp": lambda mode="vae": (VAE(64, latent_dim=4, hidden_dims=(32,), autoencoder_mode=mode),
                                   _images(16).flatten(1)),
    "vae-mlp-shaped": lambda mode="vae": (VAE((1, 8, 8), latent_dim=4, hidden_dims=(32,), autoencoder_mode=mode),
                                          _images(16)),
    "conv-8x8": lambda mode="vae": (ConvVAE(1, 8, latent_dim=4, channels=(8, 16), autoencoder_mode=mode),
                                    _images(16)),
    "conv-28x28": lambda mode="vae": (ConvVAE(1, 28, latent_dim=4, channels=(8, 16), autoencoder_mode=mode),
                                      _images(4, size=28)),
    "conv-gaussian": lambda mode="vae": (ConvVAE(1, (8, 6), latent_dim=4, channels=(8,), likelihood="gaussian",
                                                 obs_logvar="learned", autoencoder_mode=mode), _images(16)[..., :6]),
    "transformer": lambda mode="vae": (_tiny_tvae(), _tokens()),
}
TRAIN_CASES = [(case, mode) for case in MODEL_CASES for mode in ("vae", "ae", "denoising")
               if case != "transformer" or mode == "vae"]  # the autoencoder modes are for VAE and ConvVAE


@pytest.mark.parametrize("case, mode", TRAIN_CASES)
def test_models_train_and_loss_falls(case, mode):
    torch.manual_seed(0)
    model, data = MODEL_CASES[case](mode)
    assert getattr(model, "autoencoder_mode", "vae") == mode
    losses = _train(model, data, steps=12)
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first, (case, mode, losses)


def test_transformer_vae_learns_to_reconstruct():
    """80 steps on four sentences: greedy decoding of each posterior mean recovers most of its
    sentence (chance is about 1 in 9), so z carries the sentence."""
    torch.manual_seed(0)
    data = _tokens(n=4, length=8, vocab=12, seed=3)
    model = _tiny_tvae(vocab_size=12, latent_dim=8)
    model.beta = 0.05
    losses = _train(model, data, steps=80, lr=5e-3)
    assert losses[-1] < 0.5 * losses[0], losses
    rec = model.reconstruct(data, max_len=data.shape[1])
    real = data != model.pad_id
    n = min(rec.shape[1], data.shape[1])
    agree = (rec[:, :n] == data[:, :n])[real[:, :n]].float().mean()
    assert agree > 0.6, (agree, rec, data)


# ---------------------------------------------------------------- outputs and API

def test_vae_outputs_encode_decode_sample():
    torch.manual_seed(0)
    model = ConvVAE(1, 8, latent_dim=5, channels=(8, 16))
    x = _images(6)
    out = model(x)
    assert isinstance(out, VAEOutput)
    assert out.x_hat.shape == x.shape and out.mu.shape == (6, 5) and out.logvar.shape == (6, 5) and out.z.shape == (6, 5)
    torch.testing.assert_close(out.loss, out.recon + out.kl)
    post = model.encode(x)
    assert isinstance(post, DiagonalGaussian) and post.mean.shape == (6, 5)
    # the loss is the ELBO of vae_ext.elbo_loss for the decoded sample
    ref = vae_ext.elbo_loss(out.x_hat, x, out.mu, out.logvar)
    torch.testing.assert_close(tuple(out[:3]), tuple(ref))
    assert model.decode(out.z).shape == x.shape
    s1 = model.sample(3, generator=torch.Generator().manual_seed(1))
    s2 = model.sample(3, generator=torch.Generator().manual_seed(1))
    assert s1.shape == (3, 1, 8, 8) and torch.equal(s1, s2) and (s1 >= 0).all() and (s1 <= 1).all()
    assert model.reconstruct(x).shape == x.shape
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    torch.testing.assert_close(model(x, generator=g1).loss, model(x, generator=g2).loss)  # reproducible
    model.beta = 0.25
    out = model(x)
    torch.testing.assert_close(out.loss, out.recon + 0.25 * out.kl)
    mlp = VAE((1, 8, 8), latent_dim=3)
    assert mlp(x).x_hat.shape == x.shape and mlp.sample(2).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("cls", [VAE, ConvVAE])
def test_autoencoder_modes(cls):
    torch.manual_seed(0)
    x = _images(6)
    kw = dict(image_size=8, latent_dim=4) if cls is ConvVAE else dict(input_dim=(1, 8, 8), latent_dim=4)
    ae = cls(**kw, autoencoder_mode="ae")
    out = ae(x)
    assert out.kl == 0 and out.logvar is None and torch.equal(out.z, out.mu)
    torch.testing.assert_close(out.loss, out.recon)
    assert torch.equal(ae(x).x_hat, out.x_hat)  # deterministic
    assert ae.encode(x).deterministic
    # no unused parameters (DistributedDataParallel needs that): every parameter gets a gradient
    out.loss.backward()
    assert all(p.grad is not None for p in ae.parameters())

    dae = cls(**kw, autoencoder_mode="denoising", corruption=0.5)
    dae.load_state_dict(ae.state_dict())
    torch.manual_seed(1)
    noisy = dae(x)
    # the input is corrupted but the clean x is the target
    torch.manual_seed(1)
    corrupted = dae.corrupt(x)
    assert (corrupted == 0).float().mean() > 0.3
    x_hat = dae.decode(dae.encode(corrupted).mean)
    torch.testing.assert_close(noisy.x_hat, x_hat)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(x_hat, x, reduction="sum") / 6
    torch.testing.assert_close(noisy.loss, expected, rtol=1e-5, atol=1e-5)
    dae.eval()  # no corruption in eval mode: the plain autoencoder
    torch.testing.assert_close(dae(x).loss, ae(x).loss)
    gauss = cls(**kw, autoencoder_mode="denoising", corruption=0.2, corruption_type="gaussian").train()
    c = gauss.corrupt(x)
    assert 0.1 < (c - x).std() < 0.3


def test_transformer_vae_padding_is_ignored():
    torch.manual_seed(0)
    model = _tiny_tvae().eval()
    tok = _tokens(n=3, length=8)
    longer = torch.cat([tok, torch.zeros(3, 4, dtype=torch.long)], dim=1)  # more padding
    torch.testing.assert_close(model.encode(longer).mean, model.encode(tok).mean, rtol=1e-5, atol=1e-5)
    z = torch.randn(3, 8)
    real = tok != model.pad_id
    torch.testing.assert_close(model.decode_logits(z, longer)[:, :8][real], model.decode_logits(z, tok)[real],
                               rtol=1e-5, atol=1e-5)
    # a padded position's target does not count: the loss of the padded batch equals the unpadded one
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(model(longer, generator=g1).loss, model(tok, generator=g2).loss, rtol=1e-5, atol=1e-5)
    # the recon term is the categorical NLL of tokens[:, 1:] given the teacher-forced prefix
    out = model(tok)
    logits = model.decode_logits(out.z, tok[:, :-1])
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), tok[:, 1:].reshape(-1), ignore_index=0,
                                            reduction="sum") / 3
    torch.testing.assert_close(out.recon, nll, rtol=1e-5, atol=1e-5)
    # a sequence that is all padding gives a finite posterior (mean over no positions)
    assert torch.isfinite(model.encode(torch.zeros(1, 5, dtype=torch.long)).mean).all()


def test_transformer_vae_decoding():
    torch.manual_seed(0)
    model = _tiny_tvae()
    model.train()
    z = torch.randn(5, 8)
    greedy = model.decode(z, max_len=12)
    assert model.training  # mode restored
    assert greedy.dtype == torch.long and greedy.shape[0] == 5 and greedy.shape[1] <= 12
    assert (greedy[:, 0] == model.bos_id).all()
    assert not ((greedy[:, 1:] == model.bos_id).any())
    assert torch.equal(model.decode(z, max_len=12), greedy)  # greedy is deterministic
    for row in greedy.tolist():  # after eos only padding; no padding before eos
        if model.eos_id in row:
            end = row.index(model.eos_id)
            assert all(t == model.pad_id for t in row[end + 1:]) and model.pad_id not in row[:end]
        else:
            assert model.pad_id not in row
    s1 = model.sample(4, generator=torch.Generator().manual_seed(2), temperature=1.5, max_len=12)
    s2 = model.sample(4, generator=torch.Generator().manual_seed(2), temperature=1.5, max_len=12)
    assert torch.equal(s1, s2)
    hot = [model.decode(z, temperature=5.0, max_len=12) for _ in range(3)]
    assert any(not torch.equal(h, hot[0]) for h in hot[1:]), "sampling must vary"
    assert model.sample(2).shape[0] == 2
    # the greedy choice is the argmax of the teacher-forced logits of its own prefix
    model.eval()
    seq = model.decode(z[:1], max_len=6)
    logits = model.decode_logits(z[:1], seq[:, :-1])
    logits[..., [model.pad_id, model.bos_id]] = -float("inf")
    live = seq[0, 1:] != model.pad_id
    assert torch.equal(logits.argmax(-1)[0][live], seq[0, 1:][live])


def test_state_dict_save_load_roundtrip():
    torch.manual_seed(0)
    for model, data in (MODEL_CASES["conv-gaussian"](), MODEL_CASES["transformer"]()):
        _train(model, data, steps=2)
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        buf.seek(0)
        torch.manual_seed(99)
        fresh = MODEL_CASES["conv-gaussian"]()[0] if isinstance(model, ConvVAE) else MODEL_CASES["transformer"]()[0]
        fresh.load_state_dict(torch.load(buf))
        model.eval()
        fresh.eval()
        a = model(data, generator=torch.Generator().manual_seed(5))
        b = fresh(data, generator=torch.Generator().manual_seed(5))
        for x, y in zip(a, b):
            if x is not None:
                torch.testing.assert_close(x, y)


# ---------------------------------------------------------------- backends, compile, autocast

@pytest.mark.parametrize("case", ["vae-mlp", "conv-gaussian", "transformer"])
def test_models_reference_backend_matches_auto(case):
    """encode -> decode at the posterior mean -> ELBO, forward and gradients, on both backends."""
    res = {}
    for backend in ("reference", "auto"):
        torch.manual_seed(0)
        model, data = MODEL_CASES[case]()
        model.eval()
        with vae_ext.use_backend(backend):
            post = model.encode(data)
            if isinstance(model, TransformerVAE):
                x_hat = model.decode_logits(post.mean, data[:, :-1])
                elbo = model.loss_fn(x_hat, data[:, 1:], post)
            else:
                x_hat = model.decode(post.mean)
                elbo = model.loss_fn(x_hat, data, post)
            elbo.loss.backward()
            res[backend] = [*elbo, x_hat, *[p.grad for p in model.parameters()]]
    for a, b in zip(res["auto"], res["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_models_torch_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    ae, x = VAE(64, latent_dim=4, hidden_dims=(32,), autoencoder_mode="ae"), _images(4).flatten(1)
    compiled = torch.compile(ae, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x).loss, ae(x).loss)
    for model, data in ((VAE(64, latent_dim=4, hidden_dims=(32,)), x), MODEL_CASES["conv-gaussian"](),
                        (_tiny_tvae(), _tokens(n=4))):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(data)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        assert all(p.grad is not None for p in model.parameters())


def test_models_autocast_bfloat16_cpu():
    torch.manual_seed(0)
    for model, data in (MODEL_CASES["conv-8x8"](), MODEL_CASES["transformer"]()):
        model.eval()
        post = model.encode(data)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            post16 = model.encode(data)
            out = model(data)
        assert post16.mean.dtype == torch.bfloat16
        torch.testing.assert_close(post16.mean.float(), post.mean, rtol=5e-2, atol=5e-2)
        ref = model(data).loss
        assert torch.isfinite(out.loss) and abs(out.loss.item() - ref.item()) < 0.1 * abs(ref.item()) + 1.0
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_models_autocast_cuda(dtype):
    torch.manual_seed(0)
    for model, data in (MODEL_CASES["conv-8x8"](), MODEL_CASES["transformer"]()):
        model = model.cuda()
        data = data.cuda()
        ref = _train(model, data, steps=1)[0]
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        with torch.autocast("cuda", dtype=dtype):
            out = model(data)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        assert torch.isfinite(out.loss) and abs(out.loss.item() - ref) < 0.2 * abs(ref) + 1.0
        assert model.sample(2).device.type == "cuda"


# ---------------------------------------------------------------- DistributedDataParallel

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_replicas_stay_identical(tmp_path):
    """Two processes, gloo over loopback, a few training steps on different data: DDP keeps the
    replicas identical. Bounded: each process is killed after a hard timeout."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", VAE_EXT_BACKEND=vae_ext._backend.mode())
    worker = os.path.join(ROOT, "tests", "ddp_worker.py")
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, worker, str(r), "2", str(port), str(outs[r])], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=180)
            logs.append(out.decode(errors="replace")[-3000:])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.communicate()
        pytest.fail("the DDP workers did not finish within 180 s")
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r]}"
    res = [torch.load(o) for o in outs]
    assert torch.equal(res[0]["params"], res[1]["params"]), "replicas diverged"
    assert not torch.equal(res[0]["params"], res[0]["initial"]), "no training happened"
    assert torch.equal(res[0]["initial"], res[1]["initial"]), "DDP broadcasts rank 0's weights"
    assert res[0]["losses"] != res[1]["losses"]  # the ranks saw different data


# ---------------------------------------------------------------- bad input

def test_models_bad_input():
    with pytest.raises(ValueError, match="autoencoder_mode"):
        VAE(10, autoencoder_mode="vqvae")
    with pytest.raises(ValueError, match="likelihood"):
        ConvVAE(likelihood="categorical")
    with pytest.raises(ValueError, match="corruption"):
        VAE(10, autoencoder_mode="denoising", corruption=1.5)
    with pytest.raises(ValueError, match="image_size"):
        ConvVAE(image_size=(8, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        ConvVAE(1, 8)(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"\(N, 64\)"):
        VAE(64)(torch.rand(2, 63))
    with pytest.raises(ValueError, match="latent_dim"):
        VAE(64, latent_dim=4).decode(torch.rand(2, 5))
    model = _tiny_tvae()
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.rand(2, 5))
    with pytest.raises(ValueError, match="outside"):
        model(torch.full((2, 5), 16))
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones(2, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        model(torch.ones(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        model.decode(torch.zeros(1, 8), temperature=-1.0)
    with pytest.raises(ValueError, match="latent_dim"):
        model.decode(torch.zeros(1, 7))
    with pytest.raises(ValueError, match="must differ"):
        TransformerVAE(10, pad_id=0, bos_id=0)

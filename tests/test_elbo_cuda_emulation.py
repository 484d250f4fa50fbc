"""The CUDA elbo_loss kernels (csrc/elbo/elbo_cuda.cu) run on the CPU under the CUDA
emulation (tests/cuda_emu), against the CPU kernel and against the float64 reference:
the loss, its parts and every gradient buffer.

The emulated op (tests/cuda_emu/elbo_ops.cpp) fills the kernels' params with the
extension's own glue code (csrc/elbo/elbo_glue.h) from the arguments that
vae_ext.ops.elbo._op_args builds for elbo_loss, so the broadcast forms (a prior
shared by the batch read with row stride 0, obs_logvar per sample / per element)
reach the CUDA kernels exactly as on a GPU. Every tensor the kernels touch lies in
guarded, NaN-poisoned emulated device memory: an out-of-bounds access fails the
launch, an element a kernel forgets to write shows as NaN.

Kernel paths, by the sizes used here (kTile = 4096 elements per partial sum, 256
threads, 16-byte vectors of 4 float32 / 2 float64 / 8 16-bit values):
  recon_kernel / kl_kernel: vector path when the row length is a multiple of the
  vector width and every pointer is 16-byte aligned, else the scalar path; rows
  longer than kTile give several partials per sample (the two-stage reduction).
  ce_kernel: V <= 1024 a warp per row (logits in registers), 1024 < V <= 8192 a
  block per row in registers, V > 8192 a block per row streaming (online
  log-sum-exp, then a second sweep for the gradient).
  finalize_kernel: one block of 256 threads; B > 256 makes its loop over samples
  iterate. set_num_sms(n) caps grids at 8 n blocks, so grid-stride loops iterate.
Sizes are small: every CUDA thread is a fiber.
"""

import pytest
import torch

import cuda_emu
from conftest import TOL, requires_ext
from vae_ext import reference
from vae_ext.ops import elbo as elbo_ops

pytestmark = [cuda_emu.requires_emulation, requires_ext]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
NAMES = ("loss", "recon", "kl", "grad_recon", "grad_mu", "grad_logvar", "grad_prior_mu", "grad_prior_logvar",
         "grad_obs_logvar")
ALL = [True] * 6


@pytest.fixture
def num_sms(emu):
    """Sets the emulated SM count for one test (restored afterwards)."""
    first = []

    def set_num_sms(n):
        previous = emu.set_num_sms(n)
        if not first:
            first.append(previous)

    yield set_num_sms
    if first:
        emu.set_num_sms(first[0])


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_args(likelihood, dtype, *, batch=5, shape=(3, 37), vocab=11, latent=(3, 7), prior=False, obs=None,
              reduction="mean", beta=0.7, free_bits=0.0, ignore_index=-100, needs=ALL, seed=0):
    """The arguments of elbo_forward for fresh random elbo_loss inputs (float64 draws cast to dtype), built by
    the Python API's own _op_args. shape is the per-sample shape ((T,) for categorical). obs: None, 'float',
    'scalar', 'row', 'channel', 'element', 'full'. prior: False; True or 'mixed' (a prior_mu shared by the
    batch, read with row stride 0, and a per-sample prior_logvar); 'shared' (both shared); 'mu_only' (the
    glue's zero prior_logvar row)."""
    g = _gen(seed)

    def randn(*s, scale=1.0):
        return (scale * torch.randn(s, generator=g, dtype=torch.float64)).to(dtype)

    if likelihood == "categorical":
        recon = randn(batch, shape[0], vocab, scale=2.0)
        target = torch.randint(0, vocab, (batch, shape[0]), generator=g)
        target[0, ::3] = ignore_index  # padding positions
        if batch > 2:
            target[batch - 1] = ignore_index  # a sample that is all padding
    else:
        recon = randn(batch, *shape, scale=2.0 if likelihood == "bernoulli" else 1.0)
        target = torch.rand((batch, *shape), generator=g, dtype=torch.float64).to(dtype)
    mu = randn(batch, *latent)
    if free_bits > 0:  # KL spread over the latent dims, so that some are clamped and others not
        mu = mu * torch.linspace(0.05, 2.0, mu[0].numel(), dtype=torch.float64).reshape(mu.shape[1:]).to(dtype)
    logvar = randn(batch, *latent, scale=0.5)
    prior_mu = prior_logvar = None
    if prior:
        prior_mu = randn(*latent, scale=0.5)
        if prior != "mu_only":
            prior_logvar = randn(*((1,) if prior == "shared" else (batch,)), *latent, scale=0.3)
    obs_logvar = {None: None, "float": -0.3, "scalar": randn(1, scale=0.3).reshape(()),
                  "row": randn(batch, *([1] * len(shape)), scale=0.3), "channel": randn(shape[0], 1, scale=0.3),
                  "element": randn(*shape, scale=0.3), "full": randn(batch, *shape, scale=0.3)}[obs]
    args = elbo_ops._op_args(recon, target, mu, logvar, likelihood, beta, reduction, prior_mu, prior_logvar,
                             free_bits, ignore_index, obs_logvar)
    return args[:-1] + (list(needs),)


def reference_outputs(args):
    """What elbo_forward must return, from the float64 reference on the same (dtype-rounded) inputs: loss,
    recon, kl, and the gradients of sum(recon) (recon group) and sum(kl) (latent group), per element of
    the expanded priors / obs_logvar (the kernels do not sum over broadcast dims)."""
    recon, target, mu, logvar, pm, plv, obs, likelihood, reduction, beta, free_bits, ignore_index, needs = args
    batch = recon.shape[0]
    leaf = lambda t: t.double().contiguous().clone().requires_grad_()  # noqa: E731
    x, m, lv = leaf(recon), leaf(mu), leaf(logvar)
    t = target if likelihood == "categorical" else target.double()
    pm_l = plv_l = obs_l = None
    if pm is not None:
        pm_l, plv_l = leaf(pm), leaf(plv)
    obs_arg = None
    if obs is not None:
        if obs.dim() == 1:  # one value per sample
            obs_l = leaf(obs.expand(batch))
            obs_arg = obs_l.reshape((batch,) + (1,) * (recon.dim() - 1))
        else:
            obs_l = obs_arg = leaf(obs.expand(recon.shape))
    ref = reference.elbo_loss(x, t, m, lv, likelihood, beta, reduction, pm_l, plv_l, free_bits, ignore_index,
                              obs_arg)

    def grads(out, leaves):
        present = [lf for lf in leaves if lf is not None]
        gs = iter(torch.autograd.grad(out.sum(), present, allow_unused=True))
        return [None if lf is None else next(gs) for lf in leaves]

    g_x, g_obs = grads(ref.recon, [x, obs_l])
    g_m, g_lv, g_pm, g_plv = grads(ref.kl, [m, lv, pm_l, plv_l])
    wanted = [needs[0], needs[1], needs[2], needs[3] and pm is not None, needs[4] and plv is not None,
              needs[5] and obs is not None]
    gradients = [g if w else None for g, w in zip([g_x, g_m, g_lv, g_pm, g_plv, g_obs], wanted)]
    return [ref.loss.detach(), ref.recon.detach(), ref.kl.detach()] + gradients


def check_close(name, actual, expected, dtype, nan_ok=False):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not nan_ok:
        assert not torch.isnan(actual).any(), f"{name}: NaN in the emulated CUDA kernel's result (unwritten?)"
    tol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol["rtol"], atol=tol["atol"],
                               equal_nan=nan_ok, msg=lambda msg: f"{name}: {msg}")


def run_and_check(emu, args, misalign=()):
    """Runs the emulated CUDA op, the CPU op and the reference; checks every output against both."""
    out = emu.elbo_forward(*args, list(misalign))
    cpu = torch.ops.vae_ext.elbo_forward(*args)
    ref = reference_outputs(args)
    recon_dtype, latent_dtype = args[0].dtype, args[2].dtype
    dtypes = [torch.promote_types(recon_dtype, latent_dtype), recon_dtype, latent_dtype, recon_dtype,
              latent_dtype, latent_dtype, latent_dtype, latent_dtype, recon_dtype]
    for name, o, c, r, dt in zip(NAMES, out, cpu, ref, dtypes):
        assert o.dtype == c.dtype, f"{name}: dtype {o.dtype} != the CPU kernel's {c.dtype}"
        check_close(f"{name} (vs the CPU kernel)", o, c, dt)
        if r is None:
            assert o.numel() == 0, f"{name}: a gradient that was not asked for must come back empty"
        else:
            check_close(f"{name} (vs the reference)", o, r, dt)
    return out


# ---------------------------------------------------------------- Bernoulli and Gaussian, every dtype

RECON_VARIANTS = [
    ("bernoulli", None),
    ("gaussian", None),      # sum of squared errors
    ("gaussian", "float"),   # obs_logvar (1,): one value for every sample, per-row kind
    ("gaussian", "scalar"),
    ("gaussian", "row"),     # (B,): per-row kind, row stride 1
    ("gaussian", "channel"),  # per-element kind, one row for the batch (row stride 0), expanded in a middle dim
    ("gaussian", "element"),  # per-element kind, one row for the batch
    ("gaussian", "full"),    # per-element kind, B rows (row stride N)
]

# (per-sample shape, latent shape): odd sizes take the scalar paths, multiples of 8 the 16-byte vector paths;
# 'tiles' has rows of more than one kTile (several partials per sample), ending in a partial tile.
LAYOUTS = {"odd": ((3, 37), (3, 7)), "aligned": ((8, 64), (4, 16)), "tiles": ((2, 2056), (4104,))}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", RECON_VARIANTS, ids=lambda v: "-".join(x for x in v if x))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_recon_likelihoods_match_cpu_and_reference(emu, dtype, variant, layout):
    likelihood, obs = variant
    k = RECON_VARIANTS.index(variant) + list(LAYOUTS).index(layout)
    shape, latent = LAYOUTS[layout]
    args = make_args(likelihood, dtype, shape=shape, latent=latent, obs=obs, prior=k % 2 == 0,
                     reduction=("mean", "sum", "none")[k % 3], beta=0.7, batch=3 if layout == "tiles" else 5,
                     seed=k)
    run_and_check(emu, args)


# ---------------------------------------------------------------- categorical, every dtype and kernel path

VOCABS = [
    5,     # warp per row, fewer logits than lanes
    32,    # warp per row, one 16-byte vector (or less) per lane
    203,   # warp per row, several register vectors per lane, scalar loads
    256,   # warp per row, vector loads
    1024,  # warp per row, the most it holds in registers (32 logits per lane)
    1025,  # block per row, registers, scalar loads
    2048,  # block per row, registers, vector loads
    8192,  # block per row, the most it holds in registers
    8193,  # block per row, streaming, scalar loads
    8200,  # block per row, streaming, vector loads
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", VOCABS)
def test_categorical_matches_cpu_and_reference(emu, dtype, vocab):
    k = VOCABS.index(vocab)
    big = vocab > 1024
    args = make_args("categorical", dtype, vocab=vocab, batch=3 if big else 5, shape=(3,) if big else (7,),
                     prior=k % 2 == 1, reduction=("mean", "sum", "none")[k % 3], beta=1.5, seed=100 + k)
    run_and_check(emu, args)


@pytest.mark.parametrize("vocab", [11, 1500, 8300])
def test_categorical_custom_ignore_index_and_bad_ids(emu, vocab):
    # ignore_index = 0 (a valid class id used as padding) fills sample 1; an id outside [0, V) that is not
    # ignore_index gives its sample a NaN loss and zero gradient (the Python API rejects it first).
    args = make_args("categorical", torch.float32, vocab=vocab, batch=4, shape=(5,), reduction="none",
                     ignore_index=0, seed=7)
    target = args[1].clone()
    target[1] = 0
    args_pad = (args[0], target) + args[2:]
    out = run_and_check(emu, args_pad)
    assert out[1][1] == 0 and torch.all(out[3][1] == 0), "an all-padding sample has no loss and no gradient"
    bad = target.clone()
    bad[2, 1] = vocab
    bad[3, 0] = -5
    args_bad = (args[0], bad) + args[2:]
    out = emu.elbo_forward(*args_bad)
    cpu = torch.ops.vae_ext.elbo_forward(*args_bad)
    assert torch.isnan(out[1][2:]).all() and not torch.isnan(out[1][:2]).any()
    for name, o, c in zip(NAMES, out, cpu):
        check_close(name, o, c, torch.float32, nan_ok=True)
    assert torch.all(out[3][2, 1] == 0) and torch.all(out[3][3, 0] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [40, 1500, 8300])
def test_extreme_and_masked_logits(emu, dtype, vocab):
    # Logits of +-1e4 (exp overflows without the max shift) and -inf (masked classes, here every class of
    # some threads' slices, and every class but the target of one row): finite loss and gradients.
    args = make_args("categorical", dtype, vocab=vocab, batch=3, shape=(4,), reduction="sum", seed=90)
    x, target = args[0].clone(), args[1]
    x[0, 1] = x[0, 1] * 5e3
    x[1, :, : vocab // 2] = float("-inf")
    target[1] = torch.randint(vocab // 2, vocab, (4,), generator=_gen(91))
    x[2, 0] = float("-inf")
    target[2, 0] = 3
    x[2, 0, 3] = 1.0
    out = run_and_check(emu, (x, target) + args[2:])
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[3]).all()
    bern = make_args("bernoulli", dtype, shape=(8, 64), reduction="none", seed=92)
    x = bern[0].clone()
    x[0, ::2] = 1e4
    x[1, ::3] = -1e4
    out = run_and_check(emu, (x,) + bern[1:])
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[3]).all()


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "categorical"])
def test_nan_inputs_propagate_as_on_the_cpu(emu, likelihood):
    # A NaN in sample b makes recon_b / kl_b NaN, leaves the other samples alone; with free bits a NaN KL
    # column is not clamped. The emulated kernels must put NaN exactly where the CPU kernel does.
    args = list(make_args(likelihood, torch.float32, vocab=1200, shape=(6,) if likelihood == "categorical" else (40,),
                          obs="row" if likelihood == "gaussian" else None, prior=True, reduction="none",
                          free_bits=0.3, seed=95))
    args[0] = args[0].clone()
    args[0].view(args[0].shape[0], -1)[1, 5] = float("nan")
    args[2] = args[2].clone()
    args[2].view(args[2].shape[0], -1)[3, 2] = float("nan")
    out = emu.elbo_forward(*args)
    cpu = torch.ops.vae_ext.elbo_forward(*args)
    for name, o, c in zip(NAMES, out, cpu):
        assert torch.equal(torch.isnan(o), torch.isnan(c)), f"{name}: NaN in other places than on the CPU"
        check_close(name, o, c, torch.float32, nan_ok=True)
    assert torch.isnan(out[1][1]) and torch.isnan(out[2][3]) and not torch.isnan(out[0][[0, 2, 4]]).any()


# ---------------------------------------------------------------- reductions, priors, free bits, beta

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("prior", [False, "mixed", "shared", "mu_only"])
@pytest.mark.parametrize("free_bits", [0.0, 0.4])
def test_reductions_priors_free_bits(emu, dtype, reduction, prior, free_bits):
    latent = (3, 7) if dtype == torch.float32 else (4, 16)  # scalar and vector KL paths
    args = make_args("bernoulli", dtype, batch=6, latent=latent, prior=prior, reduction=reduction, beta=2.5,
                     free_bits=free_bits, seed=3)
    out = run_and_check(emu, args)
    if free_bits > 0:
        mu, logvar, pm, plv = (a.double() if a is not None else None for a in args[2:6])
        below = reference.gaussian_kl(mu, logvar, pm, plv).reshape(6, -1).mean(0) < free_bits
        assert 0 < int(below.sum()) < below.numel(), "the case must clamp some dimensions and not others"
        assert torch.all(out[4].reshape(6, -1)[:, below] == 0) and torch.all(out[5].reshape(6, -1)[:, below] == 0)


def test_free_bits_over_many_latent_dims_and_standard_prior(emu, num_sms):
    # L > 8 blocks x 256 threads with one SM: the free-bits column kernel's grid-stride loop iterates.
    num_sms(1)
    args = make_args("gaussian", torch.float32, batch=3, shape=(5,), latent=(2100,), free_bits=0.6,
                     reduction="none", seed=8)
    run_and_check(emu, args)


@pytest.mark.parametrize("needs", [[False] * 6, [True, False, True, False, True, False],
                                   [False, True, False, True, False, True]], ids=["none", "some", "others"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "categorical"])
def test_only_requested_gradients(emu, needs, likelihood):
    args = make_args(likelihood, torch.float32, prior=True, obs="row" if likelihood == "gaussian" else None,
                     shape=(8, 64) if likelihood != "categorical" else (6,), vocab=40, needs=needs, seed=9)
    run_and_check(emu, args)


# ---------------------------------------------------------------- alignment

# Each input alone 4 bytes (one float32) past a 16-byte boundary: that tensor's kernel must take its scalar path.
INPUTS = ["recon", "target", "mu", "logvar", "prior_mu", "prior_logvar", "obs_logvar"]


@pytest.mark.parametrize("which", INPUTS)
def test_misaligned_inputs(emu, which):
    i = INPUTS.index(which)
    misalign = [0] * 7
    misalign[i] = 4
    args = make_args("gaussian", torch.float32, shape=(8, 64), latent=(4, 16), prior=True, obs="full", seed=10 + i)
    run_and_check(emu, args, misalign)
    if which in ("recon", "mu"):
        cat = make_args("categorical", torch.float32, vocab=256 if which == "recon" else 2048, shape=(3,),
                        prior=True, seed=20 + i)
        run_and_check(emu, cat, misalign[:4])


def test_misaligned_16bit_and_float64(emu):
    for dtype, off in [(torch.bfloat16, 2), (torch.float16, 6), (torch.float64, 8)]:
        args = make_args("gaussian", dtype, shape=(8, 64), latent=(4, 16), prior=True, obs="element", seed=30)
        run_and_check(emu, args, [off] * 7)
        cat = make_args("categorical", dtype, vocab=2048, shape=(3,), seed=31)
        run_and_check(emu, cat, [off] * 4)


def test_non_contiguous_inputs_are_copied_by_the_glue(emu):
    # Views the glue must make contiguous (a transpose, a slice with a storage offset), as elbo.cpp does on a GPU.
    args = make_args("gaussian", torch.float32, shape=(64, 8), latent=(16, 4), obs="full", prior=True, seed=35)
    recon, target, mu = args[0], args[1], args[2]
    recon_t = recon.transpose(1, 2).contiguous().transpose(1, 2)
    target_t = torch.zeros(target.shape[:2] + (9,), dtype=target.dtype)[:, :, 1:]
    target_t.copy_(target)
    mu_t = mu.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (recon_t.is_contiguous() or target_t.is_contiguous() or mu_t.is_contiguous())
    run_and_check(emu, (recon_t, target_t, mu_t) + args[3:])


# ---------------------------------------------------------------- grid sizes, the two-stage reduction

@pytest.mark.parametrize("sms", [1, 2])
@pytest.mark.parametrize("case", ["bernoulli", "gaussian-row", "gaussian-element", "categorical-warp",
                                  "categorical-block", "categorical-stream"])
def test_grid_stride_loops(emu, num_sms, sms, case):
    # With 8 * sms blocks: more tiles / rows than blocks, so every grid-stride loop iterates.
    num_sms(sms)
    if case.startswith("categorical"):
        vocab, batch, t = {"categorical-warp": (100, 6, 30), "categorical-block": (1100, 3, 7),
                           "categorical-stream": (8210, 3, 6)}[case]
        args = make_args("categorical", torch.float32, vocab=vocab, batch=batch, shape=(t,), latent=(4104,),
                         prior=True, reduction="sum", seed=40)
    else:
        likelihood, obs = (case.split("-") + [None])[:2]
        args = make_args(likelihood, torch.float32, batch=9, shape=(4101,), latent=(4100,), obs=obs, prior=True,
                         reduction="mean", seed=41)
    run_and_check(emu, args)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_batch_larger_than_the_finalize_block(emu, reduction):
    # B > 256: each finalize thread sums several samples before the block reduction.
    args = make_args("gaussian", torch.float64, batch=300, shape=(3,), latent=(2,), obs="row", prior=True,
                     reduction=reduction, free_bits=0.3, seed=50)
    run_and_check(emu, args)


def test_empty_shapes(emu):
    for kw in [dict(batch=0), dict(shape=(0,)), dict(latent=(0,))]:
        args = make_args("gaussian", torch.float32, obs="row", prior=True, reduction="none", **kw)
        run_and_check(emu, args)
    out = emu.elbo_forward(*make_args("bernoulli", torch.float32, batch=0, reduction="mean"))
    assert torch.isnan(out[0]), "'mean' of an empty batch is NaN, as torch's"


# ---------------------------------------------------------------- determinism

@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "categorical"])
def test_bitwise_deterministic_run_to_run_and_across_grid_sizes(emu, num_sms, likelihood):
    args = make_args(likelihood, torch.float32, batch=7, shape=(4101,) if likelihood != "categorical" else (9,),
                     vocab=1500, latent=(4100,), prior=True, obs="full" if likelihood == "gaussian" else None,
                     free_bits=0.2, reduction="sum", seed=60)
    first = emu.elbo_forward(*args)
    runs = [emu.elbo_forward(*args)]
    for sms in (1, 3):
        num_sms(sms)
        runs.append(emu.elbo_forward(*args))
    for run in runs:
        for name, a, b in zip(NAMES, first, run):
            assert torch.equal(a, b), f"{name}: not bitwise reproducible"


# ---------------------------------------------------------------- the backward's scale kernel

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 37), (4, 8, 64), (3, 4100)], ids=["odd", "aligned", "tiles"])
@pytest.mark.parametrize("per_row", [False, True])
def test_scale_grad_matches_cpu(emu, num_sms, dtype, shape, per_row):
    num_sms(1)  # (3, 4100): more tiles than blocks
    g = _gen(70)
    grad = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    scale = torch.randn(shape[0] if per_row else 1, generator=g, dtype=torch.float64).to(torch.float32)
    expected = torch.ops.vae_ext.elbo_scale_grad(grad, scale)
    for misalign in (0, grad.element_size()):
        out = emu.elbo_scale_grad(grad, scale, misalign)
        assert out.dtype == dtype and out.shape == grad.shape
        assert torch.equal(out, expected), f"scale kernel differs from the CPU kernel (misalign {misalign})"
    ref = grad.double() * scale.double().reshape((-1,) + (1,) * (grad.dim() - 1))
    check_close("scaled gradient", expected, ref, dtype)


def test_forward_and_scale_compose_to_the_reference_gradients(emu):
    # What the autograd backward does with a non-trivial upstream gradient: each buffer row times its
    # group's upstream scale (recon group g_loss + g_recon, latent group beta g_loss + g_kl).
    args = make_args("gaussian", torch.float32, shape=(8, 64), latent=(4, 16), prior=True, obs="full",
                     reduction="none", beta=0.6, seed=80)
    out = emu.elbo_forward(*args)
    g = _gen(81)
    g_loss, g_recon, g_kl = (torch.randn(5, generator=g) + 0.5 for _ in range(3))
    scales = (g_loss + g_recon, 0.6 * g_loss + g_kl)
    got = [emu.elbo_scale_grad(buf, scales[0 if i in (3, 8) else 1]) for i, buf in enumerate(out) if i >= 3]

    recon, target, mu, logvar, pm, plv, obs = (a.double().clone().requires_grad_() for a in args[:2] + args[2:7])
    obs_full = obs.expand(recon.shape)
    ref = reference.elbo_loss(recon, target.detach(), mu, logvar, "gaussian", 0.6, "none", pm, plv, 0.0, -100,
                              obs_full)
    expected = torch.autograd.grad([ref.loss, ref.recon, ref.kl], [recon, mu, logvar, pm, plv, obs],
                                   [g_loss.double(), g_recon.double(), g_kl.double()])
    for name, a, b in zip(NAMES[3:], got, expected):
        check_close(name, a, b, torch.float32)

"""vae_ext.nn: each module against its torch counterpart with shared weights (outputs and
gradients), the reference backend against auto (the kernels wherever they exist),
torch.compile, autocast, and bad input."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vae_ext
from conftest import DEVICES, requires_cuda
from vae_ext import nn as vnn

F32 = dict(rtol=1e-5, atol=1e-5)


def _randn(*shape, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _pair(embed_dim=16, num_heads=4, seed=0, device="cpu", **kw):
    """A torch.nn.MultiheadAttention and a vae_ext one with its weights (non-zero biases)."""
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(embed_dim, num_heads, device=device, **kw)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
    ours = vnn.MultiheadAttention(embed_dim, num_heads, device=device, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _run(module, inputs, kwargs, grad_out, grad_w=None):
    """Forward + backward with a non-trivial upstream gradient; returns outputs and all grads."""
    module.zero_grad()
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    if inputs[0] is inputs[1] and inputs[1] is inputs[2]:
        leaves = [leaves[0]] * 3  # keep self-attention's identity (packed projection)
    elif inputs[1] is inputs[2]:
        leaves[2] = leaves[1]
    out, w = module(*leaves, **kwargs)
    loss = (out * grad_out).sum()
    if w is not None and grad_w is not None:
        loss = loss + (w * grad_w).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    return out, w, [t.grad for t in leaves], grads


def _compare(ref, ours, inputs, kwargs, need_weights=False, tol=F32, rows=None):
    out_shape_probe = ours(*inputs, **{**kwargs, "need_weights": False})[0]
    g = _randn(*out_shape_probe.shape, seed=11, device=out_shape_probe.device)
    kw = {**kwargs, "need_weights": need_weights}
    gw = None
    if need_weights:
        w_probe = ours(*inputs, **kw)[1]
        gw = _randn(*w_probe.shape, seed=12, device=w_probe.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about mixed bool/float masks
        o1, w1, gi1, gp1 = _run(ref, inputs, kw, g, gw)
    o2, w2, gi2, gp2 = _run(ours, inputs, kw, g, gw)
    torch.testing.assert_close(o2, o1, **tol)
    if need_weights:
        torch.testing.assert_close(w2, w1, **tol)
    else:
        assert w2 is None
    for a, b in zip(gi2, gi1):
        torch.testing.assert_close(a, b, **tol)
    assert gp1.keys() == gp2.keys()
    for name in gp1:
        torch.testing.assert_close(gp2[name], gp1[name], **tol, msg=lambda m, n=name: f"grad of {n}: {m}")


# ---------------------------------------------------------------- MultiheadAttention vs torch

def _masks(kind, n, h, L, S, batched=True, seed=3, device="cpu"):
    """(attn_mask, key_padding_mask) in torch's conventions; every query sees key 0."""
    g = torch.Generator().manual_seed(seed)
    am = kpm = None
    if kind.startswith("bool") or kind.startswith("float"):
        shape = (L, S) if "2d" in kind else ((n * h) if batched else h, L, S)
        hidden = torch.rand(shape, generator=g) < 0.4
        hidden[..., 0] = False
        am = hidden if kind.startswith("bool") else torch.randn(shape, generator=g).masked_fill(hidden, -math.inf)
    if "kpm" in kind:
        pad = torch.rand((n, S) if batched else (S,), generator=g) < 0.4
        pad[..., 0] = False
        kpm = pad if "fkpm" not in kind else torch.zeros(pad.shape).masked_fill(pad, -math.inf)
    to = (lambda t: None if t is None else t.to(device))
    return to(am), to(kpm)


MASK_KINDS = ["none", "bool2d", "bool3d", "float2d", "float3d", "kpm", "fkpm", "bool2d+kpm", "float3d+kpm",
              "bool3d+fkpm", "float2d+fkpm"]


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mask", MASK_KINDS)
def test_mha_matches_torch_masks(batch_first, mask):
    n, L, S, E, H = 3, 5, 7, 16, 4
    ref, ours = _pair(E, H, batch_first=batch_first)
    q, k = _randn(n, L, E, seed=1), _randn(n, S, E, seed=2)
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    am, kpm = _masks(mask, n, H, L, S)
    _compare(ref, ours, (q, k, k), dict(attn_mask=am, key_padding_mask=kpm))


@pytest.mark.parametrize("mask", ["none", "bool3d+kpm", "float2d+fkpm"])
@pytest.mark.parametrize("average", [True, False])
def test_mha_need_weights_matches_torch(mask, average):
    n, L, S, E, H = 2, 4, 6, 12, 3
    ref, ours = _pair(E, H, batch_first=True)
    q, k, v = _randn(n, L, E, seed=1), _randn(n, S, E, seed=2), _randn(n, S, E, seed=4)
    am, kpm = _masks(mask, n, H, L, S)
    _compare(ref, ours, (q, k, v), dict(attn_mask=am, key_padding_mask=kpm, average_attn_weights=average),
             need_weights=True)


@pytest.mark.parametrize("config", [
    dict(), dict(bias=False), dict(add_bias_kv=True), dict(add_zero_attn=True),
    dict(add_bias_kv=True, add_zero_attn=True), dict(kdim=10, vdim=6), dict(kdim=10, vdim=6, add_bias_kv=True),
])
@pytest.mark.parametrize("mask", ["none", "bool2d+kpm", "float3d"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_matches_torch_configurations(config, mask, need_weights):
    n, L, S, E, H = 2, 5, 6, 16, 2
    ref, ours = _pair(E, H, batch_first=True, **config)
    q = _randn(n, L, E, seed=1)
    k = _randn(n, S, config.get("kdim", E), seed=2)
    v = _randn(n, S, config.get("vdim", E), seed=4)
    am, kpm = _masks(mask, n, H, L, S)
    _compare(ref, ours, (q, k, v), dict(attn_mask=am, key_padding_mask=kpm), need_weights=need_weights)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_self_attention_packed_projection(batch_first, need_weights):
    ref, ours = _pair(24, 4, batch_first=batch_first)
    x = _randn(3, 5, 24, seed=5)
    if not batch_first:
        x = x.transpose(0, 1)
    am, kpm = _masks("bool2d+kpm", 3, 4, 5, 5)
    _compare(ref, ours, (x, x, x), dict(attn_mask=am, key_padding_mask=kpm), need_weights=need_weights)


@pytest.mark.parametrize("mask", ["none", "bool2d", "bool3d+kpm", "float3d+fkpm"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_unbatched_matches_torch(mask, need_weights):
    L, S, E, H = 4, 6, 16, 4
    ref, ours = _pair(E, H, batch_first=True)  # batch_first is ignored for unbatched input
    q, k = _randn(L, E, seed=1), _randn(S, E, seed=2)
    am, kpm = _masks(mask, 1, H, L, S, batched=False)
    _compare(ref, ours, (q, k, k), dict(attn_mask=am, key_padding_mask=kpm), need_weights=need_weights)
    assert ours(q, k, k, need_weights=False)[0].shape == (L, E)


@pytest.mark.parametrize("kpm", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_mha_is_causal_with_attn_mask_matches_torch(kpm, need_weights, mask_dtype):
    n, L, E, H = 2, 6, 16, 4
    ref, ours = _pair(E, H, batch_first=True)
    x = _randn(n, L, E, seed=1)
    am = vnn.generate_square_subsequent_mask(L, dtype=mask_dtype)
    pad = None
    if kpm:
        pad = torch.zeros(n, L, dtype=torch.bool)
        pad[1, -2:] = True
    _compare(ref, ours, (x, x, x), dict(attn_mask=am, key_padding_mask=pad, is_causal=True),
             need_weights=need_weights)
    # vae_ext also takes is_causal without a mask (torch requires one): the same result.
    a = ours(x, x, x, attn_mask=am, key_padding_mask=pad, is_causal=True, need_weights=False)[0]
    b = ours(x, x, x, key_padding_mask=pad, is_causal=True, need_weights=False)[0]
    c = ours(x, x, x, attn_mask=am, key_padding_mask=pad, need_weights=False)[0]
    torch.testing.assert_close(a, b, **F32)
    torch.testing.assert_close(a, c, **F32)


def test_mha_is_causal_with_bias_kv_keeps_extra_keys_visible():
    ref, ours = _pair(16, 4, batch_first=True, add_bias_kv=True, add_zero_attn=True)
    x = _randn(2, 5, 16, seed=1)
    am = vnn.generate_square_subsequent_mask(5)
    # torch's mask path (need_weights) pads the causal mask with visible columns; so does vae_ext.
    _compare(ref, ours, (x, x, x), dict(attn_mask=am, is_causal=True), need_weights=True)
    a = ours(x, x, x, attn_mask=am, is_causal=True, need_weights=False)[0]
    torch.testing.assert_close(a, ref(x, x, x, attn_mask=am, need_weights=True)[0], **F32)
    for kpm in (torch.tensor([[False] * 5, [False] * 3 + [True] * 2]),
                torch.tensor([[0.0] * 5, [0.0, -1.0, 0.5, -math.inf, 0.0]])):
        _compare(ref, ours, (x, x, x), dict(attn_mask=am, key_padding_mask=kpm, is_causal=True))
        _compare(ref, ours, (x, x, x), dict(attn_mask=am, key_padding_mask=kpm, is_causal=True), need_weights=True)


def test_mha_same_parameters_and_init_as_torch():
    torch.manual_seed(7)
    ref = nn.MultiheadAttention(16, 4, add_bias_kv=True, kdim=8, vdim=12)
    torch.manual_seed(7)
    ours = vnn.MultiheadAttention(16, 4, add_bias_kv=True, kdim=8, vdim=12)
    assert isinstance(ours, nn.MultiheadAttention)
    sd1, sd2 = ref.state_dict(), ours.state_dict()
    assert list(sd1) == list(sd2)
    for key in sd1:
        assert torch.equal(sd1[key], sd2[key]), key
    # and loading works both ways
    ref.load_state_dict(ours.state_dict())


def test_mha_rows_that_see_no_key_give_zeros_not_nan():
    ref, ours = _pair(16, 4, batch_first=True)
    q, k = _randn(2, 3, 16, seed=1), _randn(2, 5, 16, seed=2)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1] = True  # batch element 1 sees no key at all
    am = torch.zeros(3, 5, dtype=torch.bool)
    am[0] = True  # query 0 sees no key in any batch element
    # torch's weights path gives NaN there (its SDPA path gives NaN or zeros depending on the version)
    out_t = ref(q, k, k, key_padding_mask=kpm, attn_mask=am, need_weights=True)[0]
    assert torch.isnan(out_t[1]).all() and torch.isnan(out_t[0, 0]).all()
    for need_weights in (False, True):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        out, w = ours(qq, kk, kk, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights)
        bias = ours.out_proj.bias.detach()
        torch.testing.assert_close(out[1], bias.expand(3, 16))  # zero attention -> out_proj.bias
        torch.testing.assert_close(out[0, 0], bias)
        torch.testing.assert_close(out[0, 1:], out_t[0, 1:], **F32)  # the other rows match torch
        if need_weights:
            assert (w[1] == 0).all() and (w[0, 0] == 0).all()
        out.sum().backward()
        assert torch.isfinite(qq.grad).all() and torch.isfinite(kk.grad).all()
        assert (kk.grad[1] == 0).all()


def test_mha_dropout_in_training_mode_matches_torch_statistically():
    """Attention dropout is unbiased: averaged over many draws the output is the eval output;
    the spread per element matches torch's."""
    E, H, L, reps, p = 8, 2, 4, 3000, 0.3
    ref, ours = _pair(E, H, batch_first=True, dropout=p)
    x = _randn(1, L, E, seed=1).expand(reps, L, E).contiguous()  # `reps` independent draws in one call
    ref.eval()
    ours.eval()
    expected = ours(x[:1], x[:1], x[:1], need_weights=False)[0][0]
    ref.train()
    ours.train()
    torch.manual_seed(0)
    with torch.no_grad():
        outs = {"vae_ext": ours(x, x, x, need_weights=False)[0],
                "vae_ext weights path": ours(x, x, x, need_weights=True)[0],
                "torch": ref(x, x, x, need_weights=False)[0]}
    for name, o in outs.items():
        assert not torch.allclose(o[0], o[1]), f"{name}: dropout must differ draw to draw"
        sem = o.std(dim=0) / math.sqrt(reps)
        assert ((o.mean(dim=0) - expected).abs() <= 5 * sem + 1e-4).all(), name
    std_t = outs["torch"].std(dim=0)
    for name in ("vae_ext", "vae_ext weights path"):
        ratio = outs[name].std(dim=0) / std_t
        assert ((ratio > 0.85) & (ratio < 1.15)).all(), (name, ratio)
    # dropout is off in eval mode
    ours.eval()
    a = ours(x[:2], x[:2], x[:2], need_weights=False)[0]
    torch.testing.assert_close(a[0], a[1])


# ---------------------------------------------------------------- Transformer layers vs torch

def _layer_pair(kind, seed=0, **kw):
    torch.manual_seed(seed)
    ref = getattr(nn, kind)(**kw)
    torch.manual_seed(seed)
    ours = getattr(vnn, kind)(**kw)
    with torch.no_grad():  # non-trivial biases and norms
        for p in ref.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    ours.load_state_dict(ref.state_dict())
    return ref, ours


ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "callable": F.silu, "module": nn.GELU()}


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_encoder_layer_matches_torch(norm_first, batch_first, activation):
    kw = dict(d_model=16, nhead=4, dim_feedforward=32, dropout=0.1, activation=ACTIVATIONS[activation],
              batch_first=batch_first, norm_first=norm_first)
    ref, ours = _layer_pair("TransformerEncoderLayer", **kw)
    n, S = 3, 6
    x = _randn(n, S, 16, seed=1)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    pad = torch.zeros(n, S, dtype=torch.bool)
    pad[0, -2:] = True
    mask = vnn.generate_square_subsequent_mask(S)
    for eval_mode in (True, False):
        ref.train(not eval_mode)
        ours.train(not eval_mode)
        if not eval_mode:  # gradients: training mode with dropout off
            for m in (ref, ours):
                for mod in m.modules():
                    if isinstance(mod, nn.Dropout):
                        mod.p = 0.0
                m.self_attn.dropout = 0.0
        for kwargs in (dict(), dict(src_key_padding_mask=pad), dict(src_mask=mask, is_causal=True),
                       dict(src_mask=mask.float().masked_fill(mask, -math.inf), src_key_padding_mask=pad)):
            g = _randn(*x.shape, seed=9)
            outs, grads = [], []
            for m in (ref, ours):
                m.zero_grad()
                xx = x.clone().requires_grad_(not eval_mode)
                if eval_mode:
                    with torch.no_grad():
                        outs.append(m(xx, **kwargs))
                else:
                    y = m(xx, **kwargs)
                    (y * g).sum().backward()
                    outs.append(y)
                    grads.append([xx.grad] + [p.grad for p in m.parameters()])
            torch.testing.assert_close(outs[1], outs[0], **F32)
            for a, b in zip(grads[1:], grads[:1]):
                for ga, gb in zip(a, b):
                    torch.testing.assert_close(ga, gb, **F32)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu", "callable"])
def test_decoder_layer_matches_torch(norm_first, batch_first, activation):
    kw = dict(d_model=16, nhead=2, dim_feedforward=24, dropout=0.0, activation=ACTIVATIONS[activation],
              batch_first=batch_first, norm_first=norm_first)
    ref, ours = _layer_pair("TransformerDecoderLayer", **kw)
    n, T, S = 2, 5, 7
    tgt, mem = _randn(n, T, 16, seed=1), _randn(n, S, 16, seed=2)
    if not batch_first:
        tgt, mem = tgt.transpose(0, 1), mem.transpose(0, 1)
    tpad = torch.zeros(n, T, dtype=torch.bool)
    tpad[1, -1] = True
    mpad = torch.zeros(n, S, dtype=torch.bool)
    mpad[0, -3:] = True
    causal = vnn.generate_square_subsequent_mask(T)
    mmask = torch.rand(T, S, generator=torch.Generator().manual_seed(0)) < 0.3
    mmask[:, 0] = False
    for kwargs in (dict(), dict(tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=mpad),
                   dict(tgt_mask=causal, tgt_key_padding_mask=tpad, memory_mask=mmask)):
        g = _randn(*tgt.shape, seed=9)
        res = []
        for m in (ref, ours):
            m.zero_grad()
            t, mm = tgt.clone().requires_grad_(), mem.clone().requires_grad_()
            y = m(t, mm, **kwargs)
            (y * g).sum().backward()
            res.append([y, t.grad, mm.grad] + [p.grad for p in m.parameters()])
        for a, b in zip(res[1], res[0]):
            torch.testing.assert_close(a, b, **F32)


def test_layers_have_torch_parameter_names_and_init():
    for kind in ("TransformerEncoderLayer", "TransformerDecoderLayer"):
        torch.manual_seed(3)
        ref = getattr(nn, kind)(16, 4, 32)
        torch.manual_seed(3)
        ours = getattr(vnn, kind)(16, 4, 32)
        sd1, sd2 = ref.state_dict(), ours.state_dict()
        assert list(sd1) == list(sd2), kind
        for key in sd1:
            assert torch.equal(sd1[key], sd2[key]), (kind, key)


@pytest.mark.parametrize("batch_first", [False, True])
def test_stacks_match_torch(batch_first):
    torch.manual_seed(0)
    enc_layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first)
    dec_layer = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first)
    ref_enc = nn.TransformerEncoder(enc_layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=False)
    ref_dec = nn.TransformerDecoder(dec_layer, 2, norm=nn.LayerNorm(16))
    ours_enc = vnn.TransformerEncoder(vnn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first),
                                      2, norm=nn.LayerNorm(16))
    ours_dec = vnn.TransformerDecoder(vnn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first),
                                      2, norm=nn.LayerNorm(16))
    ours_enc.load_state_dict(ref_enc.state_dict())
    ours_dec.load_state_dict(ref_dec.state_dict())
    src, tgt = _randn(2, 6, 16, seed=1), _randn(2, 4, 16, seed=2)
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    causal = vnn.generate_square_subsequent_mask(4)
    mem_t = ref_enc(src, src_key_padding_mask=pad)
    mem_o = ours_enc(src, src_key_padding_mask=pad)
    torch.testing.assert_close(mem_o, mem_t, **F32)
    out_t = ref_dec(tgt, mem_t, tgt_mask=causal, memory_key_padding_mask=pad, tgt_is_causal=True)
    out_o = ours_dec(tgt, mem_o, tgt_mask=causal, memory_key_padding_mask=pad, tgt_is_causal=True)
    torch.testing.assert_close(out_o, out_t, **F32)


def test_subsequent_mask():
    torch.testing.assert_close(vnn.generate_square_subsequent_mask(5, dtype=torch.float32),
                               nn.Transformer.generate_square_subsequent_mask(5))
    m = vnn.generate_square_subsequent_mask(4)
    assert m.dtype == torch.bool and m[0, 1] and not m[1, 0] and not m.diagonal().any()
    assert torch.equal(~m, torch.ones(4, 4, dtype=torch.bool).tril())
    with pytest.raises(ValueError, match="size"):
        vnn.generate_square_subsequent_mask(-1)


def test_positional_encodings():
    pe = vnn.PositionalEncoding(10, dropout=0.0, max_len=50, batch_first=True)
    x = _randn(2, 7, 10, seed=1)
    y = pe(x)
    pos, i = 3, 2  # PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...)
    angle = pos / 10000 ** (2 * i / 10)
    torch.testing.assert_close(y[:, pos, 2 * i] - x[:, pos, 2 * i], torch.full((2,), math.sin(angle)), **F32)
    torch.testing.assert_close(y[:, pos, 2 * i + 1] - x[:, pos, 2 * i + 1], torch.full((2,), math.cos(angle)),
                               **F32)
    seq_first = vnn.PositionalEncoding(10, dropout=0.0, max_len=50)
    torch.testing.assert_close(seq_first(x.transpose(0, 1)).transpose(0, 1), y)
    torch.testing.assert_close(pe(x[:, 3:], offset=3), y[:, 3:])  # incremental decoding
    assert vnn.sinusoidal_table(6, 7).shape == (6, 7)  # odd width
    assert "pe" not in pe.state_dict()
    with pytest.raises(ValueError, match="max_len"):
        pe(_randn(1, 51, 10))
    learned = vnn.LearnedPositionalEncoding(10, dropout=0.0, max_len=8, batch_first=True)
    (learned(x).sum()).backward()
    assert learned.weight.grad[:7].abs().sum() > 0 and (learned.weight.grad[7] == 0).all()


# ---------------------------------------------------------------- replace_attention

def _count_fused_calls(monkeypatch):
    calls = []
    real = vae_ext.masked_attention

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(vae_ext, "masked_attention", counting)
    return calls


@pytest.mark.parametrize("batch_first", [False, True])
def test_replace_attention_transformer_same_outputs(batch_first, monkeypatch):
    torch.manual_seed(0)
    model = nn.Transformer(d_model=16, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32,
                           dropout=0.1, batch_first=batch_first)
    model.eval()
    src, tgt = _randn(3, 7, 16, seed=1), _randn(3, 5, 16, seed=2)
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, -3:] = True
    causal = vnn.generate_square_subsequent_mask(5, dtype=torch.float32)
    kw = dict(tgt_mask=causal, src_key_padding_mask=pad, memory_key_padding_mask=pad, tgt_is_causal=True)
    with torch.no_grad():
        before = model(src, tgt, **kw)
    before_grad_enabled = model(src, tgt, **kw)

    returned = vnn.replace_attention(model)
    assert returned is model
    kinds = [type(m) for m in model.modules()]
    assert nn.MultiheadAttention not in kinds and nn.TransformerEncoderLayer not in kinds
    assert kinds.count(vnn.MultiheadAttention) == 2 + 2 * 2
    assert not model.training and all(not m.training for m in model.modules())

    calls = _count_fused_calls(monkeypatch)
    with torch.no_grad():
        after = model(src, tgt, **kw)
    assert len(calls) == 6, "the fused op must run in inference too"
    torch.testing.assert_close(after, before, **F32)
    torch.testing.assert_close(model(src, tgt, **kw), before_grad_enabled, **F32)


def test_replace_attention_keeps_gradients_and_layers_false():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    ref = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    import copy
    model = copy.deepcopy(ref)
    vnn.replace_attention(model, layers=False)
    kinds = [type(m) for m in model.modules()]
    assert nn.MultiheadAttention not in kinds and kinds.count(vnn.MultiheadAttention) == 2
    assert kinds.count(nn.TransformerEncoderLayer) == 2  # layers kept
    x = _randn(2, 6, 16, seed=1)
    pad = torch.tensor([[False] * 6, [False] * 3 + [True] * 3])
    g = _randn(2, 6, 16, seed=2)
    for m in (ref, model):
        (m(x, src_key_padding_mask=pad) * g).sum().backward()
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), model.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p2.grad, p1.grad, **F32)


def test_replace_attention_plain_module_and_frozen_params():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=6, bias=False)
            self.blocks = nn.ModuleList([nn.MultiheadAttention(8, 2, add_bias_kv=True)])

    net = Net()
    net.attn.in_proj_bias  # noqa: B018
    net.blocks[0].out_proj.weight.requires_grad_(False)
    q, k, v = _randn(3, 2, 8, seed=1), _randn(4, 2, 4, seed=2), _randn(4, 2, 6, seed=3)
    before = (net.attn(q, k, v)[0], net.blocks[0](q, q, q)[0])
    vnn.replace_attention(net)
    assert type(net.attn) is vnn.MultiheadAttention and type(net.blocks[0]) is vnn.MultiheadAttention
    assert not net.blocks[0].out_proj.weight.requires_grad
    torch.testing.assert_close(net.attn(q, k, v)[0], before[0], **F32)
    torch.testing.assert_close(net.blocks[0](q, q, q)[0], before[1], **F32)
    vnn.replace_attention(net)  # idempotent
    assert type(net.attn) is vnn.MultiheadAttention


# ---------------------------------------------------------------- backends: reference vs auto (kernels)

def test_mha_and_layers_reference_backend_matches_auto():
    ref_t, ours = _pair(16, 4, batch_first=True)
    layer = vnn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    q, k = _randn(2, 5, 16, seed=1), _randn(2, 7, 16, seed=2)
    am, kpm = _masks("bool3d+kpm", 2, 4, 5, 7)
    results = {}
    for backend in ("reference", "auto"):
        with vae_ext.use_backend(backend):
            g = _randn(2, 5, 16, seed=4)
            out, _, gi, gp = _run(ours, (q, k, k), dict(attn_mask=am, key_padding_mask=kpm, need_weights=False), g)
            layer.zero_grad()
            t = q.clone().requires_grad_()
            y = layer(t, k, memory_key_padding_mask=kpm, tgt_is_causal=True)
            (y * g).sum().backward()
            results[backend] = [out, *gi, *gp.values(), y, t.grad, *[p.grad for p in layer.parameters()]]
    for a, b in zip(results["auto"], results["reference"]):
        torch.testing.assert_close(a, b, **F32)


def test_distribution_and_losses_reference_backend_match_auto():
    params = _randn(4, 6, 3, 2, seed=1).requires_grad_()
    other = vnn.DiagonalGaussian(_randn(4, 6, 3, 2, seed=2))
    x = torch.rand(4, 5, generator=torch.Generator().manual_seed(0))
    logits = _randn(4, 5, seed=3)
    loss_fn = vnn.ELBOLoss("bernoulli", beta=0.7)
    res = {}
    for backend in ("reference", "auto"):
        with vae_ext.use_backend(backend):
            params.grad = None
            post = vnn.DiagonalGaussian(params)
            z = post.sample(seed=123)
            kl = post.kl()
            kl_other = post.kl(other)
            elbo = loss_fn(logits, x, post.mean.flatten(1), post.logvar.flatten(1))
            (z.sum() + kl.sum() + 0.5 * kl_other.sum() + elbo.loss).backward()
            res[backend] = [z, kl, kl_other, *elbo, params.grad.clone()]
    for a, b in zip(res["auto"], res["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- DiagonalGaussian

@pytest.mark.parametrize("shape", [(5, 8), (3, 4, 6), (2, 6, 3, 4), (2, 4, 2, 3, 2)])
def test_diagonal_gaussian_against_torch_distributions(shape):
    params = _randn(*shape, seed=1).mul(2).requires_grad_()
    post = vnn.DiagonalGaussian(params)
    mean, logvar = params.chunk(2, dim=1)
    torch.testing.assert_close(post.mean, mean)
    torch.testing.assert_close(post.logvar, logvar)
    torch.testing.assert_close(post.std, torch.exp(0.5 * logvar))
    torch.testing.assert_close(post.var, torch.exp(logvar))
    assert post.mode() is post.mean and post.shape == mean.shape
    normal = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    std_normal = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    other_params = _randn(*shape, seed=2).requires_grad_()
    other = vnn.DiagonalGaussian(other_params)
    o_mean, o_logvar = other_params.chunk(2, dim=1)
    other_normal = torch.distributions.Normal(o_mean, torch.exp(0.5 * o_logvar))
    sample = _randn(*mean.shape, seed=3)

    ours = [post.kl(), post.kl(other), post.nll(sample), post.nll(sample, dims=[1]), post.entropy()]
    expected = [torch.distributions.kl_divergence(normal, std_normal).flatten(1).sum(1),
                torch.distributions.kl_divergence(normal, other_normal).flatten(1).sum(1),
                -normal.log_prob(sample).flatten(1).sum(1), -normal.log_prob(sample).sum(1),
                normal.entropy().flatten(1).sum(1)]
    for a, b in zip(ours, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **F32)
    grads = [_randn(*e.shape, seed=10 + i) for i, e in enumerate(expected)]
    g1 = torch.autograd.grad(sum((a * g).sum() for a, g in zip(ours, grads)), (params, other_params))
    g2 = torch.autograd.grad(sum((b * g).sum() for b, g in zip(expected, grads)), (params, other_params))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **F32)


def test_diagonal_gaussian_clamps_logvar_and_other_constructors():
    params = torch.cat([torch.zeros(2, 3), torch.tensor([[-100.0, 0.0, 100.0]] * 2)], dim=1)
    post = vnn.DiagonalGaussian(params)
    assert post.logvar.tolist()[0] == [-30.0, 0.0, 20.0]
    p2 = vnn.DiagonalGaussian(_randn(3, 4, 6, seed=1), dim=2)
    assert p2.mean.shape == (3, 4, 3)
    p3 = vnn.DiagonalGaussian.from_mean_logvar(p2.mean, p2.logvar)
    torch.testing.assert_close(p3.kl(), p2.kl())
    assert p3.parameters is None
    det = vnn.DiagonalGaussian(_randn(3, 4, seed=1), deterministic=True)
    assert torch.equal(det.sample(), det.mean) and (det.std == 0).all() and (det.var == 0).all()
    assert torch.equal(det.kl(), torch.zeros(3)) and torch.equal(det.nll(det.mean), torch.zeros(3))
    for bad, exc in ((_randn(3, 5), ValueError), (_randn(4), ValueError), (torch.ones(2, 4, dtype=torch.long),
                                                                            TypeError)):
        with pytest.raises(exc, match="DiagonalGaussian"):
            vnn.DiagonalGaussian(bad)
    with pytest.raises(ValueError, match="dim"):
        vnn.DiagonalGaussian(_randn(4, 4), dim=0)
    with pytest.raises(ValueError, match="broadcast"):
        post.kl(vnn.DiagonalGaussian(_randn(2, 8)))


def test_diagonal_gaussian_sampling():
    mean = torch.tensor([[0.5, -2.0, 3.0]]).expand(20000, 3)
    logvar = torch.tensor([[0.0, math.log(4.0), math.log(0.25)]]).expand(20000, 3)
    post = vnn.DiagonalGaussian.from_mean_logvar(mean, logvar)
    z = post.sample()
    assert z.shape == mean.shape
    torch.testing.assert_close(z.mean(0), mean[0], atol=0.05, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([1.0, 2.0, 0.5]), atol=0.05, rtol=0)
    small = vnn.DiagonalGaussian(_randn(4, 6, seed=1))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(small.sample(g1), small.sample(g2))  # a generator reproduces
    assert not torch.equal(small.sample(), small.sample())  # fresh draws
    torch.testing.assert_close(small.sample(seed=9), vae_ext.reparameterize(small.mean, small.logvar, seed=9))
    gens = [torch.Generator().manual_seed(i) for i in range(4)]  # one per batch element (diffusers)
    a = small.sample(gens)
    b = small.sample([torch.Generator().manual_seed(i) for i in range(4)])
    assert torch.equal(a, b) and a.shape == small.mean.shape
    assert small.sample(num_samples=3).shape == (3, 4, 3)
    # gradients flow through the reparameterized sample
    params = _randn(4, 6, seed=1).requires_grad_()
    vnn.DiagonalGaussian(params).sample().sum().backward()
    assert torch.equal(params.grad[:, :3], torch.ones(4, 3))


# ---------------------------------------------------------------- ELBOLoss and Reparameterize

def test_elbo_loss_module_matches_function_and_torch():
    x = torch.rand(6, 10, generator=torch.Generator().manual_seed(0))
    logits, mu, logvar = _randn(6, 10, seed=1), _randn(6, 3, seed=2), 0.5 * _randn(6, 3, seed=3)
    loss_fn = vnn.ELBOLoss("bernoulli", beta=0.5)
    out = loss_fn(logits, x, mu, logvar)
    torch.testing.assert_close(tuple(out), tuple(vae_ext.elbo_loss(logits, x, mu, logvar, beta=0.5)))
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / 6
    kl = (0.5 * (mu ** 2 + logvar.exp() - 1 - logvar)).sum() / 6
    torch.testing.assert_close(out.loss, recon + 0.5 * kl, **F32)
    post = vnn.DiagonalGaussian.from_mean_logvar(mu, logvar)
    torch.testing.assert_close(tuple(loss_fn(logits, x, post)), tuple(out))
    loss_fn.beta = 2.0  # KL annealing
    torch.testing.assert_close(loss_fn(logits, x, post).loss, recon + 2.0 * kl, **F32)
    prior = vnn.DiagonalGaussian.from_mean_logvar(torch.zeros(6, 3) + 0.3, torch.zeros(6, 3) - 0.2)
    torch.testing.assert_close(loss_fn(logits, x, post, prior=prior).kl, post.kl(prior).mean(), **F32)
    det = vnn.DiagonalGaussian.from_mean_logvar(mu, logvar, deterministic=True)
    assert loss_fn(logits, x, det).kl == 0
    # categorical with padding, gaussian with a learned observation variance
    cat = vnn.ELBOLoss("categorical", ignore_index=0, reduction="sum")
    tok = torch.randint(0, 7, (6, 5), generator=torch.Generator().manual_seed(1))
    lg = _randn(6, 5, 7, seed=4)
    ce = F.cross_entropy(lg.reshape(-1, 7), tok.reshape(-1), ignore_index=0, reduction="sum")
    torch.testing.assert_close(cat(lg, tok, mu, logvar).recon, ce, **F32)
    gauss = vnn.ELBOLoss("gaussian", obs_logvar="learned")
    assert isinstance(gauss.obs_logvar, nn.Parameter)
    gauss(logits, x, mu, logvar).loss.backward()
    assert gauss.obs_logvar.grad is not None and gauss.obs_logvar.grad != 0
    with pytest.raises(ValueError, match="likelihood"):
        vnn.ELBOLoss("poisson")
    with pytest.raises(ValueError, match="obs_logvar"):
        vnn.ELBOLoss("bernoulli", obs_logvar=0.0)
    with pytest.raises(ValueError, match="logvar"):
        loss_fn(logits, x, mu)


def test_reparameterize_module():
    mu, logvar, eps = _randn(4, 3, seed=1), _randn(4, 3, seed=2), _randn(4, 3, seed=3)
    rep = vnn.Reparameterize()
    torch.testing.assert_close(rep(mu, logvar, eps=eps), mu + eps * torch.exp(0.5 * logvar))
    torch.testing.assert_close(rep(mu, logvar, seed=3), vae_ext.reparameterize(mu, logvar, seed=3))
    assert vnn.Reparameterize(num_samples=5)(mu, logvar).shape == (5, 4, 3)
    det = vnn.Reparameterize(sample_in_eval=False).eval()
    assert torch.equal(det(mu, logvar), mu)
    assert not torch.equal(det.train()(mu, logvar), mu)
    with pytest.raises(ValueError, match="num_samples"):
        vnn.Reparameterize(num_samples=0)


# ---------------------------------------------------------------- torch.compile and autocast

def test_mha_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    _, ours = _pair(16, 4, batch_first=True)
    x = _randn(2, 6, 16, seed=1)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])

    def f(t):
        return ours(t, t, t, key_padding_mask=pad, need_weights=False, is_causal=True)[0]

    compiled = torch.compile(f, fullgraph=True)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = f(x1), compiled(x2)
    torch.testing.assert_close(y2, y1, **F32)
    g = _randn(*y1.shape, seed=2)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, **F32)


def test_layers_torch_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    enc = vnn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=True)
    dec = vnn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True)

    def f(src, tgt, pad):
        mem = enc(src, src_key_padding_mask=pad)
        return dec(tgt, mem, tgt_is_causal=True, memory_key_padding_mask=pad)

    src, tgt = _randn(2, 6, 16, seed=1), _randn(2, 4, 16, seed=2)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(src, tgt, pad), f(src, tgt, pad), **F32)
    compiled(src, tgt, pad).sum().backward()
    assert all(p.grad is not None for p in enc.parameters())


def test_autocast_bfloat16_cpu_close_to_float32():
    _, ours = _pair(16, 4, batch_first=True)
    layer = vnn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    x = _randn(2, 6, 16, seed=1)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    ref_attn = ours(x, x, x, key_padding_mask=pad, need_weights=False)[0]
    ref_w = ours(x, x, x, key_padding_mask=pad)[1]
    ref_layer = layer(x, src_key_padding_mask=pad, is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn = ours(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        w = ours(x, x, x, key_padding_mask=pad)[1]
        y = layer(x, src_key_padding_mask=pad, is_causal=True)
    assert attn.dtype == torch.bfloat16
    torch.testing.assert_close(attn.float(), ref_attn, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(w.float(), ref_w, rtol=5e-2, atol=2e-2)
    torch.testing.assert_close(y.float(), ref_layer, rtol=5e-2, atol=5e-2)
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


# ---------------------------------------------------------------- devices

@pytest.mark.parametrize("device", DEVICES)
def test_mha_matches_torch_on_device(device):
    ref, ours = _pair(32, 4, batch_first=True, device=device)
    q, k = _randn(2, 9, 32, seed=1, device=device), _randn(2, 11, 32, seed=2, device=device)
    am, kpm = _masks("bool2d+kpm", 2, 4, 9, 11, device=device)
    # CUDA: different float32 kernels (cuBLAS, SDPA) on each side; a slightly looser tolerance
    tol = F32 if device == "cpu" else dict(rtol=1e-4, atol=1e-4)
    _compare(ref, ours, (q, k, k), dict(attn_mask=am, key_padding_mask=kpm), tol=tol)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_cuda_close_to_float32(dtype):
    _, ours = _pair(64, 4, batch_first=True, device="cuda")
    layer = vnn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True, device="cuda")
    x = _randn(2, 33, 64, seed=1, device="cuda")
    pad = torch.zeros(2, 33, dtype=torch.bool, device="cuda")
    pad[1, -5:] = True
    ref_attn = ours(x, x, x, key_padding_mask=pad, need_weights=False)[0]
    ref_layer = layer(x, src_key_padding_mask=pad, is_causal=True)
    with torch.autocast("cuda", dtype=dtype):
        attn = ours(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        y = layer(x, src_key_padding_mask=pad, is_causal=True)
    assert attn.dtype == dtype and y.dtype == torch.float32  # LayerNorm runs in float32 under autocast
    torch.testing.assert_close(attn.float(), ref_attn, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(y.float(), ref_layer, rtol=5e-2, atol=5e-2)
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


# ---------------------------------------------------------------- bad input

def test_mha_bad_input_raises_clear_errors():
    attn = vnn.MultiheadAttention(16, 4, batch_first=True)
    q, k = _randn(2, 5, 16), _randn(2, 7, 16)
    cases = [
        (ValueError, "embed_dim=16", (_randn(2, 5, 12), k, k), {}),
        (ValueError, "kdim=16", (q, _randn(2, 7, 8), _randn(2, 7, 8)), {}),
        (ValueError, "vdim=16", (q, k, _randn(2, 7, 10)), {}),
        (ValueError, "other layout", (q, _randn(7, 2, 16), _randn(7, 2, 16)), {}),  # (S, N, E) to batch_first
        (ValueError, "same length", (q, k, _randn(2, 6, 16)), {}),
        (ValueError, "3-D like query", (q, k[0], k[0]), {}),
        (ValueError, "2-D", (_randn(1, 2, 5, 16), k, k), {}),
        (ValueError, "key_padding_mask must have shape", (q, k, k), dict(key_padding_mask=torch.zeros(7, 2).bool())),
        (ValueError, "attn_mask must have shape", (q, k, k), dict(attn_mask=torch.zeros(5, 6).bool())),
        (ValueError, "attn_mask must have shape", (q, k, k), dict(attn_mask=torch.zeros(2, 5, 7).bool())),
        (ValueError, "attn_mask must have shape", (q, k, k), dict(attn_mask=torch.zeros(1, 2, 4, 5, 7).bool())),
        (TypeError, "attn_mask must be a bool", (q, k, k), dict(attn_mask=torch.zeros(5, 7, dtype=torch.long))),
        (TypeError, "key_padding_mask must be a bool", (q, k, k), dict(key_padding_mask=torch.zeros(2, 7).int())),
        (TypeError, "query must be a floating", (q.long(), k, k), {}),
        (TypeError, "is_causal", (q, k, k), dict(is_causal=1)),
    ]
    for exc, match, args, kwargs in cases:
        for need_weights in (False, True):
            with pytest.raises(exc, match=match):
                attn(*args, need_weights=need_weights, **kwargs)
    # the seq-first module given batch-first tensors with a padding mask: the mask shape says so
    seq_first = vnn.MultiheadAttention(16, 4)
    with pytest.raises(ValueError, match="batch_first=False"):
        seq_first(_randn(2, 5, 16), _randn(3, 7, 16), _randn(3, 7, 16))
    with pytest.raises(ValueError, match="key_padding_mask"):
        seq_first(_randn(5, 3, 16), _randn(7, 3, 16), _randn(7, 3, 16), key_padding_mask=torch.zeros(7, 3).bool())
    with pytest.raises(ValueError):
        vnn.TransformerEncoderLayer(16, 4, activation="swish")

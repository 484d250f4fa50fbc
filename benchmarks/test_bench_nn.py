"""vae_ext.nn modules and vae_ext.models training steps: the fused ops (backend 'auto') vs the
same module on the reference ops vs torch's own module (peer).

    impl fused      vae_ext module, backend auto (the kernels where they exist)
    impl reference  the same vae_ext module under use_backend('reference')
    impl torch      torch.nn.MultiheadAttention / TransformerEncoderLayer with the same weights
"""

import contextlib

import pytest
import torch

import vae_ext
from conftest import DEVICES, run_benchmark
from vae_ext import nn as vnn
from vae_ext.models import ConvVAE, TransformerVAE


def _size(device):
    # (batch, seq, embed, heads, dtype)
    if torch.device(device).type == "cuda":
        return 8, 1024, 1024, 16, torch.bfloat16
    return 4, 256, 256, 4, torch.float32


def _backend(impl):
    return vae_ext.use_backend("reference") if impl == "reference" else contextlib.nullcontext()


def _attn_flops(b, s, e, backward):
    f = 4 * b * s * s * e  # QK^T and PV
    return f * 3.5 if backward else f  # backward ~2.5x the forward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["fused", "reference", "torch"])
def test_multihead_attention(benchmark, device, pass_, impl):
    b, s, e, h, dtype = _size(device)
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(e, h, batch_first=True, device=device, dtype=dtype)
    module = ref if impl == "torch" else vnn.MultiheadAttention(e, h, batch_first=True, device=device, dtype=dtype)
    module.load_state_dict(ref.state_dict())
    x = torch.randn(b, s, e, device=device, dtype=dtype, requires_grad=pass_ != "fwd")
    pad = torch.zeros(b, s, dtype=torch.bool, device=device)
    pad[: b // 2, -s // 4:] = True  # a quarter of the keys are padding in half the batch
    causal = vnn.generate_square_subsequent_mask(s, device=device)

    def call():
        with _backend(impl):
            out = module(x, x, x, key_padding_mask=pad, attn_mask=causal, is_causal=True, need_weights=False)[0]
            if pass_ != "fwd":
                out.sum().backward()
        return out

    if pass_ == "fwd":
        with torch.no_grad():
            run_benchmark(benchmark, call, device=device, op="nn.MultiheadAttention",
                          case=f"B{b} S{s} E{e} H{h} causal+pad {str(dtype)[6:]}", impl=impl, pass_=pass_,
                          flops=_attn_flops(b, s, e, False) / 2)
    else:
        run_benchmark(benchmark, call, device=device, op="nn.MultiheadAttention",
                      case=f"B{b} S{s} E{e} H{h} causal+pad {str(dtype)[6:]}", impl=impl, pass_=pass_,
                      flops=_attn_flops(b, s, e, True) / 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fused", "reference", "torch"])
def test_transformer_encoder_layer_train_step(benchmark, device, impl):
    b, s, e, h, dtype = _size(device)
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(e, h, 4 * e, dropout=0.0, batch_first=True, device=device, dtype=dtype)
    layer = ref if impl == "torch" else vnn.TransformerEncoderLayer.from_torch(ref)
    x = torch.randn(b, s, e, device=device, dtype=dtype, requires_grad=True)
    pad = torch.zeros(b, s, dtype=torch.bool, device=device)
    pad[: b // 2, -s // 4:] = True

    def call():
        with _backend(impl):
            out = layer(x, src_key_padding_mask=pad)
            out.sum().backward()
        return out

    run_benchmark(benchmark, call, device=device, op="nn.TransformerEncoderLayer",
                  case=f"B{b} S{s} E{e} H{h} pad {str(dtype)[6:]}", impl=impl, pass_="fwd+bwd")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_name", ["ConvVAE", "TransformerVAE"])
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_model_train_step(benchmark, device, model_name, impl):
    torch.manual_seed(0)
    if model_name == "ConvVAE":
        model = ConvVAE(1, 28, latent_dim=16).to(device)
        data = torch.rand(64, 1, 28, 28, device=device)
        case = "28x28 batch 64"
    else:
        model = TransformerVAE(1000, d_model=128, nhead=4, dim_feedforward=512, latent_dim=32, max_len=64,
                               dropout=0.1).to(device)
        data = torch.randint(3, 1000, (16, 64), device=device)
        data[:, 0] = model.bos_id
        data[8:, 40:] = model.pad_id
        case = "vocab 1000 d128 T64 batch 16"
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def call():
        with _backend(impl):
            out = model(data)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        return out

    run_benchmark(benchmark, call, device=device, op=f"models.{model_name}", case=case, impl=impl, pass_="fwd+bwd")

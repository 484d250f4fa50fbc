"""The integrations on tiny random-init models built from configs (no downloads): diffusers
(FusedAttnProcessor on Attention, AutoencoderKL, UNet2DConditionModel), transformers
(attn_implementation="vae_ext" on BERT, GPT-2 and Llama with GQA, generate() with the KV
cache) and timm (a ViT through patch_sdpa and replace_attention).

Oracle: the library's own default attention on the same weights; outputs and parameter
gradients agree within float32 tolerance. The fused-path checks make torch's SDPA fail
inside vae_ext (vae_ext.sdpa.torch_sdpa, the fallback), so they prove vae_ext's kernels ran."""

import copy
import importlib
import sys

import pytest
import torch

import vae_ext
from conftest import requires_ext
from vae_ext import sdpa

pytestmark = requires_ext

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

RTOL = ATOL = 1e-5  # float32 (DESIGN.md)
GRAD_TOL = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fused_only(monkeypatch):
    """vae_ext's SDPA may not hand anything to torch's: the kernels must run."""
    def fail(*args, **kwargs):
        raise AssertionError("vae_ext fell back to torch's SDPA")
    monkeypatch.setattr(sdpa, "torch_sdpa", fail)


def close(a, b, rtol=RTOL, atol=ATOL, what=""):
    assert not torch.isnan(a).any(), f"{what}: NaN"
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def grads_close(m_ref, m_new, what):
    for (name, p), (_, q) in zip(m_ref.named_parameters(), m_new.named_parameters()):
        if p.grad is None:
            assert q.grad is None, f"{what}: {name} has a gradient only with vae_ext"
            continue
        close(q.grad, p.grad, GRAD_TOL, GRAD_TOL, f"{what}: grad of {name}")


def backward_of(out, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * g).sum().backward()


# ---------------------------------------------------------------- missing libraries

@pytest.mark.parametrize("lib", ["diffusers", "transformers", "timm"])
def test_missing_library_names_the_extra(monkeypatch, lib):
    monkeypatch.setitem(sys.modules, lib, None)  # import lib -> ImportError
    monkeypatch.delitem(sys.modules, f"vae_ext.integrations.{lib}", raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'vae_ext\[{lib}\]'"):
        importlib.import_module(f"vae_ext.integrations.{lib}")
    monkeypatch.delitem(sys.modules, f"vae_ext.integrations.{lib}", raising=False)


def test_import_vae_ext_imports_no_integration_library():
    import os
    import subprocess

    code = ("import sys, vae_ext; vae_ext.integrations; "
            "print(sorted(m for m in ('diffusers', 'transformers', 'timm') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- diffusers

from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402

from vae_ext.integrations.diffusers import FusedAttnProcessor  # noqa: E402


def _attention_pair(**kw):
    torch.manual_seed(0)
    ref = Attention(**kw).eval()
    new = Attention(**kw).eval()
    new.load_state_dict(ref.state_dict())
    new.set_processor(FusedAttnProcessor())
    return ref, new


@pytest.mark.parametrize("case", ["self_group_norm_residual_rescale_4d", "cross_with_mask_norm_cross",
                                  "spatial_norm", "qk_norm", "no_scale_qk"])
def test_diffusers_attention_module(fused_only, case):
    g = torch.Generator().manual_seed(1)
    kw, call = {}, {}
    x = torch.randn(2, 12, 32, generator=g)
    if case == "self_group_norm_residual_rescale_4d":
        kw = dict(query_dim=32, heads=4, dim_head=8, norm_num_groups=8, residual_connection=True,
                  rescale_output_factor=2.0, bias=True)
        x = torch.randn(2, 32, 3, 4, generator=g)
    elif case == "cross_with_mask_norm_cross":
        kw = dict(query_dim=32, cross_attention_dim=16, heads=2, dim_head=16, cross_attention_norm="layer_norm")
        mask = torch.ones(2, 7)
        mask[1, 4:] = 0
        call = dict(encoder_hidden_states=torch.randn(2, 7, 16, generator=g),
                    attention_mask=(1 - mask) * -10000.0)
    elif case == "spatial_norm":
        kw = dict(query_dim=32, heads=4, dim_head=8, spatial_norm_dim=4, residual_connection=True)
        x = torch.randn(2, 32, 4, 4, generator=g)
        call = dict(temb=torch.randn(2, 4, 2, 2, generator=g))
    elif case == "qk_norm":
        kw = dict(query_dim=32, heads=4, dim_head=8, qk_norm="layer_norm")
    elif case == "no_scale_qk":
        kw = dict(query_dim=32, heads=4, dim_head=8, scale_qk=False)
    ref, new = _attention_pair(**kw)
    if case == "no_scale_qk":
        ref.set_processor(AttnProcessor())  # AttnProcessor2_0 ignores attn.scale; the classic one uses it
    else:
        assert isinstance(ref.processor, AttnProcessor2_0)
    xr, xn = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_new = ref(xr, **call), new(xn, **call)
    close(out_new, out_ref, what=case)
    backward_of(out_ref)
    backward_of(out_new)
    close(xn.grad, xr.grad, GRAD_TOL, GRAD_TOL, f"{case}: input grad")
    grads_close(ref, new, case)


def _tiny_vae():
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32),
                                   latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=16)


def test_diffusers_autoencoder_kl(fused_only):
    torch.manual_seed(0)
    ref = _tiny_vae().eval()
    new = _tiny_vae().eval()
    new.load_state_dict(ref.state_dict())
    new.set_attn_processor(FusedAttnProcessor())
    assert all(isinstance(p, FusedAttnProcessor) for p in new.attn_processors.values())
    assert len(new.attn_processors) == 2  # the encoder's and the decoder's mid-block attention
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out_ref = ref(x, sample_posterior=False).sample
    out_new = new(x, sample_posterior=False).sample
    close(out_new, out_ref, what="AutoencoderKL")
    backward_of(out_ref)
    backward_of(out_new)
    grads_close(ref, new, "AutoencoderKL")


def _tiny_unet():
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)


def test_diffusers_unet2d_condition_with_encoder_mask(fused_only):
    torch.manual_seed(0)
    ref = _tiny_unet().eval()
    new = _tiny_unet().eval()
    new.load_state_dict(ref.state_dict())
    new.set_attn_processor(FusedAttnProcessor())
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 7, 32, generator=g)
    mask = torch.ones(2, 7)
    mask[1, 3:] = 0  # padded text tokens: diffusers turns this into an additive bias
    t = torch.tensor([10, 500])
    out_ref = ref(sample, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
    out_new = new(sample, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
    close(out_new, out_ref, what="UNet2DConditionModel")
    backward_of(out_ref)
    backward_of(out_new)
    grads_close(ref, new, "UNet2DConditionModel")


# ---------------------------------------------------------------- transformers

import vae_ext.integrations.transformers as vt  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def registered():
    vt.register()


def _pair(cfg, model_cls=transformers.AutoModel, ref_impl="sdpa"):
    # One config object each: from_config keeps the object and sets its _attn_implementation.
    torch.manual_seed(0)
    ref = model_cls.from_config(copy.deepcopy(cfg), attn_implementation=ref_impl).eval()
    new = model_cls.from_config(copy.deepcopy(cfg), attn_implementation="vae_ext").eval()
    new.load_state_dict(ref.state_dict())
    assert ref.config._attn_implementation == ref_impl and new.config._attn_implementation == "vae_ext"
    return ref, new


def bert_config():
    return transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=64)


def gpt2_config():
    return transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                   bos_token_id=0, eos_token_id=98, pad_token_id=98)


def llama_config():
    return transformers.LlamaConfig(vocab_size=99, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    bos_token_id=0, eos_token_id=98, pad_token_id=98)


def _inputs(b=3, s=10, left_pad=False, seed=1):
    ids = torch.randint(1, 98, (b, s), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(b, s, dtype=torch.long)
    if left_pad:
        mask[1, :4] = 0
        mask[2, :1] = 0
    else:
        mask[1, 6:] = 0
        mask[2, 9:] = 0
    return ids, mask


@pytest.mark.parametrize("ref_impl", ["sdpa", "eager"])
def test_transformers_bert_padding(fused_only, ref_impl):
    ref, new = _pair(bert_config(), ref_impl=ref_impl)
    ids, mask = _inputs()
    out_ref = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    out_new = new(input_ids=ids, attention_mask=mask).last_hidden_state
    close(out_new, out_ref, what=f"BERT vs {ref_impl}")
    backward_of(out_ref)
    backward_of(out_new)
    grads_close(ref, new, "BERT")


@pytest.mark.parametrize("config", [gpt2_config, llama_config], ids=["gpt2", "llama_gqa"])
@pytest.mark.parametrize("padded", [False, True])
def test_transformers_decoders_causal_padding(fused_only, config, padded):
    ref, new = _pair(config(), transformers.AutoModelForCausalLM)
    ids, mask = _inputs(left_pad=True)
    kw = dict(attention_mask=mask) if padded else {}
    out_ref = ref(input_ids=ids, **kw).logits
    out_new = new(input_ids=ids, **kw).logits
    if padded:  # positions that are padding are not compared (only what the model is used for)
        keep = mask.bool()
        out_ref, out_new = out_ref[keep], out_new[keep]
    close(out_new, out_ref, what=f"{config.__name__} padded={padded}")
    backward_of(out_ref)
    backward_of(out_new)
    grads_close(ref, new, config.__name__)


@pytest.mark.parametrize("config", [gpt2_config, llama_config], ids=["gpt2", "llama_gqa"])
def test_transformers_generate_with_kv_cache_same_tokens(fused_only, config):
    ref, new = _pair(config(), transformers.AutoModelForCausalLM)
    ids, mask = _inputs(left_pad=True, seed=3)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=98)
    with torch.no_grad():
        a = ref.generate(ids, **kw)
        b = new.generate(ids, **kw)
    assert a.shape[1] == ids.shape[1] + 8
    assert torch.equal(a, b)


def test_transformers_fully_padded_row_is_zero_not_nan(fused_only):
    # The attention function itself: a query row whose keys are all masked gives zeros.
    q = torch.randn(2, 4, 5, 8)
    k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.ones(2, 1, 5, 6, dtype=torch.bool)
    mask[1] = False  # sample 1 fully padded

    class Module(torch.nn.Module):
        is_causal = False
        num_key_value_groups = 2
    out, weights = vt.attention_forward(Module(), q, k, v, mask, scaling=0.3)
    assert weights is None and out.shape == (2, 5, 4, 8)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    # ... and a whole model with a fully padded sequence stays finite.
    _, bert = _pair(bert_config())
    ids, am = _inputs()
    am[0] = 0
    assert torch.isfinite(bert(input_ids=ids, attention_mask=am).last_hidden_state).all()


def test_transformers_from_pretrained(fused_only, tmp_path):
    ref, _ = _pair(llama_config(), transformers.AutoModelForCausalLM)
    ref.save_pretrained(tmp_path)  # safetensors, no download
    new = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="vae_ext").eval()
    assert new.config._attn_implementation == "vae_ext"
    ids, mask = _inputs(left_pad=True)
    keep = mask.bool()
    close(new(input_ids=ids, attention_mask=mask).logits[keep], ref(input_ids=ids, attention_mask=mask).logits[keep],
          what="from_pretrained")


def test_transformers_register_is_idempotent_and_set_attn_implementation_works(fused_only):
    assert vt.register() == "vae_ext"
    torch.manual_seed(0)
    m = transformers.AutoModel.from_config(bert_config()).eval()
    ids, mask = _inputs()
    want = m(input_ids=ids, attention_mask=mask).last_hidden_state
    m.set_attn_implementation("vae_ext")
    close(m(input_ids=ids, attention_mask=mask).last_hidden_state, want, what="set_attn_implementation")


# ---------------------------------------------------------------- timm

from timm.models.vision_transformer import VisionTransformer  # noqa: E402

import vae_ext.integrations.timm as vtimm  # noqa: E402


def _tiny_vit():
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10,
                             qkv_bias=True)


@pytest.mark.parametrize("how", ["patch_sdpa", "integrations.timm.replace_attention", "nn.replace_attention"])
def test_timm_vit(fused_only, how):
    torch.manual_seed(0)
    ref = _tiny_vit().eval()
    new = _tiny_vit().eval()
    new.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    params_before = [id(p) for p in new.parameters()]
    if how == "integrations.timm.replace_attention":
        vtimm.replace_attention(new)
    elif how == "nn.replace_attention":
        vae_ext.nn.replace_attention(new)
    if how != "patch_sdpa":
        assert sum(isinstance(m, vtimm.FusedAttention) for m in new.modules()) == 2
        assert [id(p) for p in new.parameters()] == params_before  # in place: an optimizer stays valid
    out_ref = ref(x)
    if how == "patch_sdpa":
        with vae_ext.patch_sdpa():
            out_new = new(x)
            backward_of(out_new)
    else:
        out_new = new(x)
        backward_of(out_new)
    close(out_new, out_ref, what=f"ViT {how}")
    backward_of(out_ref)
    grads_close(ref, new, f"ViT {how}")

"""Forward time of tiny models from diffusers, transformers and timm with their default
attention and with vae_ext's (the integrations), on the CPU (float32, inference).

    impl default   the library's own attention (torch's SDPA)
    impl fused     vae_ext: FusedAttnProcessor / attn_implementation="vae_ext" / patch_sdpa

The models are small random-init configs (no downloads) with sequences long enough that
attention is a visible part of the forward.
"""

import contextlib

import pytest
import torch

import vae_ext
from conftest import run_benchmark

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

IMPLS = ["default", "fused"]


def _bench(benchmark, model_name, impl, fn):
    with torch.no_grad():
        run_benchmark(benchmark, fn, device="cpu", op="integrations", case=model_name, impl=impl, pass_="fwd")


@pytest.mark.parametrize("impl", IMPLS)
def test_autoencoder_kl(benchmark, impl):
    from vae_ext.integrations.diffusers import FusedAttnProcessor

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                  latent_channels=4, norm_num_groups=16, layers_per_block=1).eval()
    if impl == "fused":
        vae.set_attn_processor(FusedAttnProcessor())
    x = torch.randn(1, 3, 128, 128)  # mid-block attention over 64x64 = 4096 positions
    _bench(benchmark, "AutoencoderKL 128x128 (attn S=4096)", impl, lambda: vae(x, sample_posterior=False).sample)


@pytest.mark.parametrize("impl", IMPLS)
def test_unet2d_condition(benchmark, impl):
    from vae_ext.integrations.diffusers import FusedAttnProcessor

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16).eval()
    if impl == "fused":
        unet.set_attn_processor(FusedAttnProcessor())
    sample, context, t = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 64), torch.tensor([10, 500])
    _bench(benchmark, "UNet2DCondition 32x32 ctx77", impl,
           lambda: unet(sample, t, encoder_hidden_states=context).sample)


def _hf(cfg, cls, impl):
    if impl == "fused":
        import vae_ext.integrations.transformers as vt

        vt.register()
    torch.manual_seed(0)
    return cls.from_config(cfg, attn_implementation="vae_ext" if impl == "fused" else "sdpa").eval()


@pytest.mark.parametrize("impl", IMPLS)
def test_bert(benchmark, impl):
    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=512)
    model = _hf(cfg, transformers.AutoModel, impl)
    ids = torch.randint(0, 1000, (4, 512), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 512, dtype=torch.long)
    mask[1:, 384:] = 0  # padding
    _bench(benchmark, "BERT 2x64 B4 S512 padded", impl,
           lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state)


@pytest.mark.parametrize("impl", IMPLS)
def test_llama_gqa(benchmark, impl):
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = _hf(cfg, transformers.AutoModelForCausalLM, impl)
    ids = torch.randint(0, 1000, (2, 512), generator=torch.Generator().manual_seed(0))
    _bench(benchmark, "Llama GQA 2x64 B2 S512 causal", impl, lambda: model(input_ids=ids).logits)


@pytest.mark.parametrize("impl", IMPLS)
def test_gpt2_generate(benchmark, impl):
    cfg = transformers.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                                  pad_token_id=0, eos_token_id=999)
    model = _hf(cfg, transformers.AutoModelForCausalLM, impl)
    ids = torch.randint(1, 999, (2, 256), generator=torch.Generator().manual_seed(0))
    _bench(benchmark, "GPT-2 2x64 generate 256+16 (KV cache)", impl,
           lambda: model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False))


@pytest.mark.parametrize("impl", IMPLS)
def test_vit(benchmark, impl):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=224, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224)  # 785 tokens

    def call():
        with vae_ext.patch_sdpa() if impl == "fused" else contextlib.nullcontext():
            return vit(x)
    _bench(benchmark, "ViT 2x64 patch8 224px (S=785)", impl, call)

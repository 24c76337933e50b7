import torch
from diffusers import (WanTransformer3DModel, FluxTransformer2DModel, SD3Transformer2DModel,
    HunyuanVideoTransformer3DModel, CogVideoXTransformer3DModel, QwenImageTransformer2DModel, LTXVideoTransformer3DModel)

def wan():
    m = WanTransformer3DModel(patch_size=(1,2,2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    kw = dict(hidden_states=torch.randn(1,4,2,8,8), timestep=torch.tensor([500.]), encoder_hidden_states=torch.randn(1,8,32), return_dict=False)
    return m, kw

def flux():
    m = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4,6,6))
    kw = dict(hidden_states=torch.randn(1,16,8), encoder_hidden_states=torch.randn(1,8,32), pooled_projections=torch.randn(1,32),
        timestep=torch.tensor([0.5]), img_ids=torch.randn(16,3), txt_ids=torch.zeros(8,3), guidance=None, return_dict=False)
    return m, kw

def sd3():
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=4, qk_norm="rms_norm", dual_attention_layers=(0,))
    kw = dict(hidden_states=torch.randn(1,4,8,8), encoder_hidden_states=torch.randn(1,8,32), pooled_projections=torch.randn(1,32),
        timestep=torch.tensor([500.]), return_dict=False)
    return m, kw

def hunyuan():
    m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(4,6,6))
    kw = dict(hidden_states=torch.randn(1,4,2,4,4), timestep=torch.tensor([500.]), encoder_hidden_states=torch.randn(1,8,32),
        encoder_attention_mask=torch.ones(1,8), pooled_projections=torch.randn(1,32), guidance=torch.tensor([3500.]), return_dict=False)
    return m, kw

def cogvideox():
    m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16, text_embed_dim=32,
        num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=True)
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    T,H,W=3,8,8
    cos,sin = get_3d_rotary_pos_embed(16, None, (W//2, H//2), T, use_real=True, grid_type="slice", max_size=(H//2,W//2))
    kw = dict(hidden_states=torch.randn(1,T,4,H,W), encoder_hidden_states=torch.randn(1,8,32), timestep=torch.tensor([500]),
        image_rotary_emb=(cos,sin), return_dict=False)
    return m, kw

def qwen():
    m = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(8,4,4))
    kw = dict(hidden_states=torch.randn(1,16,16), encoder_hidden_states=torch.randn(1,8,16), encoder_hidden_states_mask=torch.ones(1,8),
        timestep=torch.tensor([1.0]), img_shapes=[(1,4,4)], return_dict=False)
    return m, kw

MODELS = dict(wan=wan, flux=flux, sd3=sd3, hunyuan=hunyuan, cogvideox=cogvideox, qwen=qwen)

def ltx():  # (not in MODELS: used by the sequence-parallel tests)
    m = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=2, caption_channels=16)
    kw = dict(hidden_states=torch.randn(1,32,8), encoder_hidden_states=torch.randn(1,8,16), timestep=torch.tensor([500]),
        encoder_attention_mask=torch.ones(1,8), num_frames=2, height=4, width=4, return_dict=False)
    return m, kw


def flux2():  # (not in MODELS: used by the sequence-parallel tests)
    from diffusers import Flux2Transformer2DModel
    m = Flux2Transformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32, axes_dims_rope=(4,4,4,4))
    kw = dict(hidden_states=torch.randn(1,16,8), encoder_hidden_states=torch.randn(1,8,32), timestep=torch.tensor([0.5]),
        img_ids=torch.randn(1,16,4), txt_ids=torch.zeros(1,8,4), guidance=torch.tensor([3.5]), return_dict=False)
    return m, kw

def chronoedit():  # (not in MODELS: used by the sequence-parallel tests)
    from diffusers import ChronoEditTransformer3DModel
    m = ChronoEditTransformer3DModel(patch_size=(1,2,2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, image_dim=16, added_kv_proj_dim=32, rope_max_seq_len=32)
    kw = dict(hidden_states=torch.randn(1,4,2,8,8), timestep=torch.tensor([500.]), encoder_hidden_states=torch.randn(1,8,32),
        encoder_hidden_states_image=torch.randn(1,4,16), return_dict=False)
    return m, kw


def wan_for_export():
    """Factory for `python -m mindiesd_compile export tiny_models:wan_for_export OUT_DIR`."""
    torch.manual_seed(0)
    model, kwargs = wan()
    return model.eval(), (), kwargs


def ltx2():  # (not in MODELS: used by the sequence-parallel tests) video and audio, each with its text
    from diffusers.models.transformers.transformer_ltx2 import LTX2VideoTransformer3DModel
    m = LTX2VideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2,
        audio_attention_head_dim=16, audio_cross_attention_dim=32, num_layers=2, caption_channels=16)
    kw = dict(hidden_states=torch.randn(1, 32, 8), audio_hidden_states=torch.randn(1, 8, 8),
        encoder_hidden_states=torch.randn(1, 8, 16), audio_encoder_hidden_states=torch.randn(1, 8, 16),
        timestep=torch.tensor([500.]), encoder_attention_mask=torch.ones(1, 8),
        audio_encoder_attention_mask=torch.ones(1, 8), num_frames=2, height=4, width=4, audio_num_frames=8,
        return_dict=False)
    return m, kw

"""Sequence-parallel plans for diffusers models that ship no ``_cp_plan``, or one a traced graph cannot follow
(same format as diffusers').

Used only where ``options["parallel_plan"]`` gives none, and in place of the model class's own only where
``replaces_shipped`` says so (Qwen-Image: its plan splits the text too, at every block, but with a text mask
its forward fixes the text length in the traced graph; LTX-2: its plan leaves a RoPE over the video tokens
whole). Keyed by the class of the model's transformer blocks: Dynamo's graph records the modules traced inside
the model, never the model's own class (and SD3's blocks live in ``diffusers.models.attention``).

These models build RoPE, position embeddings and the text mask in their forward from the whole video, so
their image tokens are split where they enter the first block, not at the model's input. Text tokens stay
whole on every rank: joint attention slices the text heads locally (``passes/ulysses.py``), so the key
order, and the text mask, are the single-process ones. Their blocks read the image token count from
shapes (RoPE reshapes, the split of the joint output), so they are traced with that count dynamic:
``dynamic`` names the model input and dim that ``mark_sequence_dynamic`` marks, ``dynamic_ints`` the inputs
holding Python ints the positions are built from (Qwen-Image's ``img_shapes``), traced as symbols too.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Tuple


@dataclasses.dataclass(frozen=True)
class BuiltinPlan:
    model: str                # the diffusers model class, for messages
    plan: dict                # diffusers _cp_plan format
    dynamic: Dict[str, int]   # model input -> dim to trace dynamic (the image token count follows it), besides
    #                           the inputs the plan's "" entries split
    dynamic_ints: Tuple[str, ...] = ()  # model inputs whose Python ints are traced as symbols
    replaces_shipped: bool = False      # used in place of the model class's own _cp_plan


@functools.lru_cache(maxsize=None)
def _plans() -> Dict[str, BuiltinPlan]:
    try:
        import diffusers
        from diffusers.models._modeling_parallel import ContextParallelInput as Split, ContextParallelOutput as Gather
    except ImportError:  # no diffusers (or an older one): no diffusers model to plan for either
        return {}
    image = {"hidden_states": Split(split_dim=1, expected_dims=3, split_output=False)}
    rope = {i: Split(split_dim=0, expected_dims=2, split_output=True) for i in (0, 1)}  # (cos, sin), image only
    gather = Gather(gather_dim=1, expected_dims=3)
    plans = {
        "HunyuanVideoTransformerBlock": BuiltinPlan(
            "HunyuanVideoTransformer3DModel",
            {"transformer_blocks.0": image, "rope": rope, "proj_out": gather},
            dynamic={"hidden_states": 3}),   # [B, C, T, H, W]: H (T may be 1)
        "JointTransformerBlock": BuiltinPlan(
            "SD3Transformer2DModel", {"transformer_blocks.0": image, "proj_out": gather},
            dynamic={"hidden_states": 2}),   # [B, C, H, W]
        "QwenImageTransformerBlock": BuiltinPlan(
            "QwenImageTransformer2DModel",
            {"transformer_blocks.0": image, "pos_embed": {0: rope[0]}, "proj_out": gather},  # image positions
            dynamic={"hidden_states": 1}, dynamic_ints=("img_shapes",), replaces_shipped=True),  # [B, S, C]
    }
    ltx2 = getattr(diffusers, "LTX2VideoTransformer3DModel", None)  # (an older diffusers has none)
    if ltx2 is not None:  # its shipped plan, and the RoPE of the audio-video cross-attention: per video token too
        plans["LTX2VideoTransformerBlock"] = BuiltinPlan(
            "LTX2VideoTransformer3DModel", {**ltx2._cp_plan, "cross_attn_rope": ltx2._cp_plan["rope"]}, dynamic={},
            replaces_shipped=True)
    return plans


def builtin_plan(block_class: type) -> Optional[BuiltinPlan]:
    return _plans().get(block_class.__name__)


def builtin_applies(builtin: Optional[BuiltinPlan], shipped: Optional[dict]) -> bool:
    """Whether the built-in plan is the one used, beside the model class's own ``shipped`` plan (or None)."""
    return builtin is not None and (shipped is None or builtin.replaces_shipped)

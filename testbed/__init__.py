"""Quality testbed: a small video DiT (diffusers ``WanTransformer3DModel``) trained by our own script on
procedurally generated videos of moving shapes, shipped in ``testbed/checkpoint``.

- ``testbed.videos``: the procedural data (shape kind, colour and direction as the condition) and the
  condition tokens fed to the transformer as ``encoder_hidden_states``.
- ``testbed.train``: deterministic flow-matching training (``python -m testbed.train --help``).
- ``testbed.sample``: load the checkpoint with ``from_pretrained`` and sample with diffusers'
  ``FlowMatchEulerDiscreteScheduler`` (50 steps, classifier-free guidance).
- ``testbed.evaluate``: a frame detector (task accuracy), PSNR/SSIM of an optimized run against the same
  seeds without it, and a PNG strip writer; ``quality(baseline, optimized, conditions)`` for benchmarks.
"""
from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"

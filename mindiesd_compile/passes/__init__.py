"""One pass per file; ``PASSES`` maps each pattern name of ``options['patterns']`` to its pass."""
from .adaln import AdaLNPass
from .attention import AttentionPass
from .base import FusionPass, GraphPass, NoMatch
from .cleanup import CleanupPass
from .gated_residual import GatedResidualPass
from .layer_norm import LayerNormPass
from .manager import PassManager
from .rms_norm import RMSNormPass
from .rope import RoPEPass

PASSES = {p.name: p for p in (CleanupPass, AttentionPass, RoPEPass, RMSNormPass, LayerNormPass, AdaLNPass,
                              GatedResidualPass)}

__all__ = ["PASSES", "PassManager", "GraphPass", "FusionPass", "NoMatch"]

"""Which stages each method runs and which of them are evaluated (light: no torch import).

Adding a method = its module in ``ncd/methods``, an entry here, a config block and a rule.
"""

from __future__ import annotations

# method -> stages whose model.ckpt is evaluated into metrics.json, in pipeline order
EVALUATED_STAGES: dict[str, tuple[str, ...]] = {
    "kmeans": ("cluster",),
    "scan": ("pretrain", "scan", "selflabel"),
    "uno": ("discover",),
    "cld": ("cld",),
    "twostage": ("superand", "twostage"),
    "sela": ("sela",),
}

METHOD_NAMES = tuple(EVALUATED_STAGES)

"""One LightningModule per method, registered by name; stage runners live beside them."""

from __future__ import annotations

from ncd.methods.registry import EVALUATED_STAGES, METHOD_NAMES


def lightning_modules() -> dict:
    """Name → LightningModule class (imported on demand: Lightning is slow to import)."""
    from ncd.methods.cld import CLDModule
    from ncd.methods.scan import SCANModule
    from ncd.methods.selflabel import SelfLabelModule
    from ncd.methods.sela import SeLaModule
    from ncd.methods.simclr import SimCLRModule
    from ncd.methods.superand import SuperANDModule
    from ncd.methods.twostage import TwoStageModule
    from ncd.methods.uno import UNODiscover, UNOPretrain

    return {"simclr": SimCLRModule, "scan": SCANModule, "selflabel": SelfLabelModule,
            "uno_pretrain": UNOPretrain, "uno_discover": UNODiscover,
            "superand": SuperANDModule, "twostage": TwoStageModule, "cld": CLDModule,
            "sela": SeLaModule}


__all__ = ["EVALUATED_STAGES", "METHOD_NAMES", "lightning_modules"]

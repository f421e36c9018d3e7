"""One module per method: its LightningModule(s), its stage runners and its evaluators, named by the
stage table (:mod:`ncd.stages`)."""

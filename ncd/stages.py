"""The stage table: every method's stages, declared once (imports neither torch nor Lightning).

A stage's ``name`` is at once its Snakemake rule, its ``python -m ncd`` sub-command and its output
folder (``results/{exp}/seed{seed}/{name}/``). Everything that enumerates stages or methods derives
from these two dicts: the workflow's rules (``workflow/rules/stages.smk`` loops over them), the
command line, the evaluate dispatch, the per-stage config slices (:func:`ncd.config.stage_config`),
the metrics vocabulary and the report's grouping.

Adding a method = its module in ``ncd/methods``, its entries here, its schema block
(``ncd/schema/<block>.yaml``) and its config blocks. An evaluator lives in a module that imports no
Lightning (``ncd/methods/<method>_eval.py``, or the stage's own module when that trains nothing): an
evaluate job imports only ``ncd.methods.evaluate`` and the evaluator's module
(tests/test_import_weight.py checks it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Method:
    """A method an experiment names (``method:``); ``paper`` groups it in the report."""

    name: str
    paper: str
    doc: str


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: a training (or fitting) step that writes one artifact per run."""

    name: str
    method: str
    run: str                                   # "module:function", called as fn(ctx, *inputs, out)
    doc: str
    inputs: Mapping[str, str] = field(default_factory=dict)   # argument -> upstream stage (its artifact)
    blocks: tuple[str, ...] = ()               # config blocks read besides the shared keys
    output: str = "model.ckpt"
    evaluate: str | None = None                # "module:function" → (rows, confusion); None: not evaluated
    #                                            (a module without Lightning: evaluating trains nothing)
    gpu: bool = True                           # asks the cluster for a GPU
    multi_device: bool = False                 # may train on runtime.devices > 1 (DDP)
    resumable: bool = True                     # trains with Lightning and resumes from last.ckpt
    # inputs a config turns off (e.g. the two-stage ablation trains stage 2 from scratch)
    skip_inputs: Callable[[dict[str, Any]], frozenset[str]] | None = None
    # whether an experiment's config runs the stage at all (e.g. CLD's linear probe); None: always
    enabled: Callable[[dict[str, Any]], bool] | None = None

    def enabled_for(self, cfg: dict[str, Any]) -> bool:
        """Whether an experiment with config ``cfg`` runs (and evaluates) this stage."""
        return self.enabled is None or bool(self.enabled(cfg))

    def inputs_for(self, cfg: dict[str, Any]) -> dict[str, str]:
        """The upstream stages this stage reads under experiment config ``cfg``."""
        skip = self.skip_inputs(cfg) if self.skip_inputs else frozenset()
        return {k: v for k, v in self.inputs.items() if k not in skip}

    @property
    def cli(self) -> str:
        """The sub-command (= the stage name)."""
        return self.name


# Keys of an experiment that change what any of its stages computes: every slice carries them.
SHARED_KEYS: tuple[str, ...] = ("method", "dataset", "data_path", "split", "split_name", "backbone",
                                "backbone_kwargs", "transform", "runtime")
# runtime keys that only ask a cluster for resources: a change reruns nothing
RUNTIME_REQUESTS: tuple[str, ...] = ("mem_mb", "time_min", "gpu")


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("kmeans", "Baselines", "k-means on raw pixels"),
    Method("scan", "SCAN", "SimCLR pretext, neighbour mining, SCAN clustering, self-labeling"),
    Method("uno", "UNO", "supervised pretraining on the known classes, then discovery of the novel ones"),
    Method("sela", "SeLa", "self-labelling by optimal transport"),
    Method("cld", "CLD", "instance discrimination with the cross-level group branch"),
    Method("twostage", "Two-stage", "Super-AND embedding, then fixed normalised heads with IIC"),
)}


def _twostage_skip(cfg: dict[str, Any]) -> frozenset[str]:
    return frozenset({"embed"}) if cfg.get("twostage", {}).get("init") == "scratch" else frozenset()


def _cld_probe_on(cfg: dict[str, Any]) -> bool:
    return int((cfg.get("cld_probe") or {}).get("epochs", 0)) > 0


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("cluster", "kmeans", "ncd.methods.kmeans:run_kmeans", "k-means on raw pixels (the baseline)",
          blocks=("cluster",), evaluate="ncd.methods.kmeans:evaluate_kmeans", gpu=False, resumable=False),
    Stage("pretrain", "scan", "ncd.methods.simclr:run_pretrain",
          "SimCLR pretext training (or a MoCo import): the backbone every later SCAN stage starts from",
          blocks=("pretrain", "download", "augment"), evaluate="ncd.methods.scan_eval:evaluate_pretrain",
          multi_device=True),
    Stage("mine", "scan", "ncd.methods.neighbors:run_mine",
          "nearest neighbours of every image on the pretext features (faiss, exact inner product)",
          inputs={"pretrain": "pretrain"}, blocks=("mine",), output="neighbors.npz", resumable=False),
    Stage("pretext_kmeans", "scan", "ncd.methods.pretext_kmeans:run_pretext_kmeans",
          "SCAN's baseline: k-means on the pretext features", inputs={"pretrain": "pretrain"},
          blocks=("pretext_kmeans",), evaluate="ncd.methods.pretext_kmeans:evaluate_pretext_kmeans",
          resumable=False),
    Stage("scan", "scan", "ncd.methods.scan:run_scan",
          "SCAN clustering on the mined neighbours; keeps the head with the lowest validation loss",
          inputs={"pretrain": "pretrain", "neighbors": "mine"}, blocks=("scan", "augment"),
          evaluate="ncd.methods.scan_eval:evaluate_clustering", multi_device=True),
    Stage("selflabel", "scan", "ncd.methods.selflabel:run_selflabel", "self-labeling from the selected SCAN head",
          inputs={"scan": "scan"}, blocks=("selflabel", "augment"), evaluate="ncd.methods.scan_eval:evaluate_clustering",
          multi_device=True),
    Stage("pretrain_supervised", "uno", "ncd.methods.uno:run_pretrain_supervised",
          "UNO stage 1: supervised pretraining on the known classes", blocks=("pretrain_supervised", "augment"),
          multi_device=True),
    Stage("discover", "uno", "ncd.methods.uno:run_discover",
          "UNO stage 2: novel class discovery with the unified objective",
          inputs={"pretrain": "pretrain_supervised"}, blocks=("discover", "augment"),
          evaluate="ncd.methods.uno_eval:evaluate_uno", multi_device=True),
    Stage("sela", "sela", "ncd.methods.sela:run_sela",
          "SeLa: multi-head self-labelling, Sinkhorn-Knopp label steps between CE epochs",
          blocks=("sela", "augment"), evaluate="ncd.methods.sela_eval:evaluate_sela"),
    Stage("cld", "cld", "ncd.methods.cld:run_cld",
          "CLD: an instance-discrimination learner (NPID, MoCo, MoCo v2, InfoMin) + the cross-level group branch",
          blocks=("cld", "evaluate", "augment"), evaluate="ncd.methods.cld_eval:evaluate_cld", multi_device=True),
    Stage("cld_probe", "cld", "ncd.methods.cld_probe:run_cld_probe",
          "CLD's ImageNet linear probe: a linear classifier on the frozen CLD backbone (runs when cld_probe.epochs > 0)",
          inputs={"cld": "cld"}, blocks=("cld_probe",), evaluate="ncd.methods.cld_probe_eval:evaluate_cld_probe",
          multi_device=True, enabled=_cld_probe_on),
    Stage("superand", "twostage", "ncd.methods.superand:run_superand",
          "two-stage classifier, stage 1: Super-AND embedding (memory bank, five rounds of anchor neighbourhoods)",
          blocks=("superand", "augment"), evaluate="ncd.methods.twostage_eval:evaluate_twostage"),
    Stage("twostage", "twostage", "ncd.methods.twostage:run_twostage",
          "two-stage classifier, stage 2: fixed normalised heads (IIC) + consistency-preserving loss",
          inputs={"embed": "superand"}, blocks=("twostage", "superand", "augment"),
          evaluate="ncd.methods.twostage_eval:evaluate_twostage", skip_inputs=_twostage_skip),
)}

# The metrics table (DESIGN.md): its columns and vocabulary, extended, never renamed.
METRICS_COLUMNS: tuple[str, ...] = ("experiment", "method", "stage", "dataset", "split", "seed", "head", "metric",
                                    "value")
SPLITS: tuple[str, ...] = ("train", "test", "train-novel", "test-novel", "test-known")
METRICS: tuple[str, ...] = ("acc", "nmi", "ari", "ami", "acc_top5", "acc_agnostic", "knn_top1", "linear_top1",
                            # best over epochs, chosen on the test split (ncd.eval.rows.selected_on_test)
                            "knn_top1_selected_on_test", "linear_top1_selected_on_test")

# the block the evaluate command reads besides the evaluated stage's own slice
EVALUATE_BLOCKS: tuple[str, ...] = ("evaluate",)


def stages_of(method: str, cfg: dict[str, Any] | None = None) -> list[Stage]:
    """The stages an experiment of ``method`` runs, in pipeline order: all of them, or with ``cfg``
    (the experiment's config) only those it enables."""
    return [s for s in STAGES.values() if s.method == method and (cfg is None or s.enabled_for(cfg))]


def evaluated_stages(method: str, cfg: dict[str, Any] | None = None) -> list[str]:
    """Names of the stages of ``method`` (enabled by ``cfg`` when given) whose artifact is evaluated
    into metrics.json."""
    return [s.name for s in stages_of(method, cfg) if s.evaluate]


def artifact(stage: str) -> str:
    """Path of a stage's artifact relative to a run folder (``{stage}/{output}``)."""
    return f"{stage}/{STAGES[stage].output}"


def load(entry: str) -> Callable[..., Any]:
    """Import ``module:function`` (a stage's ``run`` or ``evaluate``)."""
    module, _, fn = entry.partition(":")
    return getattr(importlib.import_module(module), fn)


__all__ = ["Method", "Stage", "METHODS", "STAGES", "SHARED_KEYS", "RUNTIME_REQUESTS", "EVALUATE_BLOCKS",
           "METRICS_COLUMNS", "SPLITS", "METRICS", "stages_of", "evaluated_stages", "artifact", "load"]

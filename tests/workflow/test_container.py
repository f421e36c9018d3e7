"""The Apptainer recipe and the slurm profile, checked statically (Apptainer cannot be installed on
these machines: the image itself is built with `make container` where it exists)."""

from __future__ import annotations

import os
import re
import tomllib

import pytest
import yaml
from test_workflow import (  # same folder: pytest puts it on sys.path
    BIN,
    ROOT,
    job_counts,
    snakemake,
)

DEF = ROOT / "containers/ncd.def"
SECTIONS = {"%labels", "%files", "%post", "%environment", "%test", "%help", "%runscript", "%setup", "%startscript"}


def parse_def(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Header keys and section bodies of an Apptainer definition file."""
    header: dict[str, str] = {}
    sections: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("%"):
            current = line.split()[0]
            assert current in SECTIONS, f"unknown section {current}"
            assert current not in sections, f"section {current} twice"
            sections[current] = ""
        elif current is None:
            if line.strip() and not line.lstrip().startswith("#"):
                key, sep, value = line.partition(":")
                assert sep, f"header line without 'key: value': {line!r}"
                header[key.strip()] = value.strip()
        else:
            sections[current] += line + "\n"
    return header, sections


def pins(requirements: list[str]) -> dict[str, str]:
    return {m.group(1).lower(): m.group(2) for r in requirements if (m := re.match(r"^([A-Za-z0-9_.-]+)==(\S+)$", r))}


def test_recipe_parses_and_builds_from_a_cuda_pytorch_base():
    header, sections = parse_def(DEF.read_text())
    assert header["Bootstrap"] == "docker"
    assert header["From"].startswith("pytorch/pytorch:") and "cuda" in header["From"]
    assert {"%files", "%post", "%test"} <= set(sections)
    for line in sections["%files"].split("\n"):
        if line.strip():
            src, dst = line.split()
            assert (ROOT / src).exists(), f"%files source {src} missing"
            assert dst.startswith("/opt/ncd")
    assert "pip install /opt/ncd" in sections["%post"]  # the project with pyproject.toml's requirements


def test_recipe_pins_equal_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = pins(project)
    assert {"torch", "torchvision"} <= set(wanted)
    _, sections = parse_def(DEF.read_text())
    in_def = pins(re.findall(r'"([^"]+==[^"]+)"', sections["%post"]))
    assert in_def == {k: wanted[k] for k in in_def}, (in_def, wanted)
    assert {"torch", "torchvision"} <= set(in_def)
    base_torch = re.match(r"pytorch/pytorch:([\d.]+)-", parse_def(DEF.read_text())[0]["From"]).group(1)
    assert base_torch == wanted["torch"]


def test_profile_settings():
    # one copy of the profile: ./slurm, which `--profile slurm` finds in the working directory, links to it
    assert (ROOT / "slurm").is_symlink() and (ROOT / "slurm").resolve() == (ROOT / "workflow/profiles/slurm").resolve()
    prof = yaml.safe_load((ROOT / "workflow/profiles/slurm/config.yaml").read_text())
    assert prof["executor"] == "slurm"
    assert prof["software-deployment-method"] == "apptainer"
    assert "--nv" in prof["apptainer-args"].split()
    assert prof["retries"] >= 1


def _dry_jobs(*extra: str) -> list[dict[str, str]]:
    """Rule and resources of every job of the paper DAG under the slurm profile."""
    env_path = f"{BIN}{os.pathsep}{os.environ['PATH']}{os.pathsep}{ROOT / 'containers/dryrun-bin'}"
    # the profile by name, as a cluster user types it: Snakemake finds ./slurm, the link to workflow/profiles/slurm
    r = snakemake("-n", "--profile", "slurm", "--configfile", "workflow/experiments/paper.yaml",
                  *extra, env_path=env_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = r.stdout + r.stderr
    jobs = []
    for block in re.split(r"\n(?=rule \w+:)", out):
        m = re.match(r"rule (\w+):", block)
        res = re.search(r"^\s+resources: (.*)$", block, re.MULTILINE)
        if m and res:
            jobs.append({"rule": m.group(1), **dict(kv.split("=", 1) for kv in res.group(1).split(", "))})
    assert job_counts(out)["all"] == 1
    return jobs


GPU_RULES = {"pretrain", "mine", "pretext_kmeans", "scan", "selflabel", "pretrain_supervised", "discover", "evaluate",
             "sela", "cld", "cld_probe", "superand", "twostage"}


@pytest.mark.timeout(300)
def test_every_gpu_rule_requests_gpus_and_names_the_image():
    jobs = _dry_jobs()
    assert {j["rule"] for j in jobs if "gpu" in j and int(j["gpu"]) > 0} == GPU_RULES
    for j in jobs:
        if j["rule"] in GPU_RULES:
            assert j["container"] == "containers/ncd.sif", j
            assert int(j["gpu"]) >= 1 and j["tasks_per_gpu"] == "1" and j["slurm_extra"] == "--signal=USR1@300", j
            assert int(j["cpus_per_task"]) in (4, 8) and int(j["mem_mb"]) >= 32000, j  # per task (GPU)
    # UNO and CLD on ImageNet: N GPUs = N tasks started by the rule's srun (mpi); evaluation on one GPU
    multi = [j for j in jobs if int(j.get("gpu", 0)) > 1]
    assert {j["rule"] for j in multi} == {"pretrain_supervised", "discover", "cld", "cld_probe"}  # UNO and CLD on ImageNet
    assert all(j["tasks"] == j["gpu"] and j["mpi"] == "srun" for j in multi)
    assert not [j for j in jobs if j["rule"] == "evaluate" and j["gpu"] != "1"]
    assert not [j for j in jobs if j["rule"] == "cluster" and j.get("gpu", "0") != "0"]
    assert {j["rule"] for j in jobs if "cpus_per_task" not in j} == {"prepare_dataset", "aggregate", "report", "all"}


@pytest.mark.timeout(300)
def test_gres_switch():
    jobs = _dry_jobs("--config", "slurm={gpu_request: gres, gpu_model: a100}")
    gpu_jobs = [j for j in jobs if j["rule"] in GPU_RULES]
    assert gpu_jobs and all("gpu" not in j for j in gpu_jobs)
    assert {j["gres"] for j in gpu_jobs} == {"gpu:a100:1", "gpu:a100:2", "gpu:a100:8"}

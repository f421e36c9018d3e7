"""ncd.utils.keep_freed_memory: every `python -m ncd` stage keeps freed memory for reuse, so repeated
training-step-sized allocations stop page-faulting (the kernel time it saves), with identical results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# a batch of SimCLR views of CIFAR-shaped images, as a training step makes them: many temporaries of
# 0.1-6 MB, allocated and freed in every step; minor page faults counted after two warm-up steps
WORKLOAD = """
import json, resource, torch
from ncd.utils import keep_freed_memory
applied = keep_freed_memory()
torch.set_num_threads(1)
from ncd.data.batched import simclr_views
from ncd.data.registry import get_info
g = torch.Generator().manual_seed(0)
x = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=g)
keys = torch.stack([torch.zeros(256, dtype=torch.long), torch.arange(256)], 1)
views = simclr_views(get_info("cifar10", "data"), seed=0)
for _ in range(2):
    out = views(x, keys)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    out = views(x, keys)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults, "sum": float(out.double().sum())}))
"""


def _run(tuning: str) -> dict:
    env = {**os.environ, "NCD_MALLOC_TUNING": tuning}
    r = subprocess.run([sys.executable, "-c", WORKLOAD], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    on, off = _run("1"), _run("0")
    assert on["applied"] is True and off["applied"] is False
    # glibc's defaults give back and fault in megabytes per step; tuned, the steps reuse their memory
    assert off["faults"] > 2000, off
    assert on["faults"] * 5 < off["faults"], (on, off)
    assert on["sum"] == off["sum"]  # where the memory comes from changes no result


def test_the_cli_applies_it_before_a_stage_runs(monkeypatch):
    import ncd.cli

    calls = []
    monkeypatch.setattr(ncd.cli, "keep_freed_memory", lambda: calls.append(True) or True)
    with pytest.raises(SystemExit):  # argparse: no sub-command
        ncd.cli.main(["--no-such-option"])
    assert calls == [True]

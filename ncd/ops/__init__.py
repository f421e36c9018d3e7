"""Tensor operations shared by :mod:`ncd.losses`, :mod:`ncd.models` and :mod:`ncd.data`.

A neutral layer: it imports only torch, NumPy and :mod:`ncd.errors`, never another ``ncd``
package, so every package above may use it without an import cycle.

* :mod:`ncd.ops.checks` - input checks (tensors, index vectors, positive numbers, keyword options);
* :mod:`ncd.ops.normalized` - epsilon-free L2 normalisation and the two-stage classifier's
  :func:`normalized_fc` head;
* :mod:`ncd.ops.init` - :func:`npid_memory_init`, the NPID memory bank / MoCo queue initialisation;
* :mod:`ncd.ops.sinkhorn` - SeLa's chunked Sinkhorn-Knopp solver and its memory plan.
"""

from ncd.ops.checks import check_index, check_options, check_positive, check_tensor, check_tensor_pair
from ncd.ops.init import npid_memory_init
from ncd.ops.normalized import l2_normalize, normalized_fc
from ncd.ops.sinkhorn import STORAGES, label_step_plan, run_sinkhorn

__all__ = ["check_index", "check_options", "check_positive", "check_tensor", "check_tensor_pair", "npid_memory_init",
           "l2_normalize", "normalized_fc", "STORAGES", "label_step_plan", "run_sinkhorn"]

"""Training on after the switch from the masked student to the dense one, shared by both training loops.

A masked student computes at full width until the end of the run. Once the pruner has reached its target
for good, a loop swaps it for the materialised model (which computes the same function, parity-checked)
and carries the optimizer's state over, cut to the kept units, so the late steps cost what the small model
costs and training goes on as if nothing had changed.
"""

from __future__ import annotations

import torch
from torch import nn

from homoexport.pruning.pruner import HomoDistilPruner, slice_optimizer_state

STUDENT_PREFIX = "student."  # parameter names are "student.<model param>" or "loss.<projection>" in both loops


def carry_optimizer_state(pruner: HomoDistilPruner, old_state: dict[str, dict], optimizer: torch.optim.Optimizer,
                          new_params: dict[str, nn.Parameter]) -> None:
    """Put each parameter's old optimizer state (by name) on its dense successor in ``optimizer``.

    Student parameters are sliced like their weights (:func:`slice_optimizer_state`); the loss projections map
    the student's hidden dims to the teacher's, so their input columns follow the kept hidden dims.
    """
    kept_hidden = pruner.masks.hidden.nonzero().flatten()
    for name, param in new_params.items():
        state = old_state.get(name)
        if not state:
            continue
        if name.startswith(STUDENT_PREFIX):
            optimizer.state[param] = slice_optimizer_state(pruner, name[len(STUDENT_PREFIX):], state)
        else:
            optimizer.state[param] = {k: v[:, kept_hidden.to(v.device)].clone() if torch.is_tensor(v) and v.dim() == 2 else v
                                      for k, v in state.items()}

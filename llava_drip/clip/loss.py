"""The loss open_clip_train's loop calls: open_clip's own loss plus DRIP's weighted boundary prior.

The loop calls `loss(**model_out, output_dict=True)` and back-propagates the sum of the returned
dict, so returning {"contrastive_loss", "boundary_loss"} puts the prior into the optimiser and
into the loop's log line with no change to the loop. DRIP's model output also carries
`boundary_ratio` / `group_ratio`, which open_clip's losses would reject as unknown keywords
(spec P11): they are taken out here and handed to the step monitor.
"""
from typing import Optional

import torch
import torch.nn as nn

from .monitor import StepMonitor

DRIP_OUTPUT_KEYS = ("boundary_loss", "boundary_ratio", "group_ratio")


class DRIPLoss(nn.Module):
    """Wraps whichever loss open_clip's `create_loss` built (ClipLoss, SigLipLoss, ...)."""

    def __init__(self, base: nn.Module, boundary_weight: float = 1.0, monitor: Optional[StepMonitor] = None):
        super().__init__()
        self.base = base
        self.boundary_weight = boundary_weight
        self.monitor = monitor

    def forward(self, *, boundary_loss: Optional[torch.Tensor] = None, boundary_ratio: Optional[torch.Tensor] = None,
                group_ratio: Optional[torch.Tensor] = None, output_dict: bool = False, **model_out):
        losses = self.base(**model_out, output_dict=True)
        if not isinstance(losses, dict):  # a loss that ignores output_dict
            losses = {"contrastive_loss": losses}
        if boundary_loss is not None:
            # the key ends in "_loss": newer open_clip loops sum only such keys (spec 8.4)
            losses["boundary_loss"] = self.boundary_weight * boundary_loss
        if self.monitor is not None:
            self.monitor.observe_loss(losses, boundary_ratio, group_ratio)
        return losses if output_dict else sum(losses.values())

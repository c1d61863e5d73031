"""Boundary map of one image for the demo: the tower's input crop with each DRIP segment coloured.

Drawing is `llava_drip.inspect.tokens.draw_boundary_map`, so the demo and `llava-drip tokens --viz`
show the same picture; this module only runs the LLaVA model's tower to get the segments.
"""
from typing import Optional

import numpy as np
import torch
from PIL import Image

from llava_drip.model.multimodal_encoder.towers import DRIPVisionTower


def segments_from_boundaries(boundaries: torch.Tensor, num_groups: int) -> np.ndarray:
    """[N] hard boundaries (1 closes a segment, raster order) -> [N] segment ids, -1 past the last kept one."""
    b = boundaries.detach().float().cpu()
    seg = (torch.cumsum(b, 0) - b).round().long()  # a patch's segment = boundaries strictly before it
    seg[seg >= num_groups] = -1
    return seg.numpy()


@torch.no_grad()
def boundary_map(tower, pixel_values: torch.Tensor, image_processor, size: int = 384,
                 label: bool = False, budget=None) -> Optional[Image.Image]:
    """Render the boundary map of pixel_values [1, 3, H, W]; None for towers that keep every patch.

    label: print "G segments / N patches" in the corner (off where a UI shows the count itself).
    budget: DRIP tokens to keep (llava_drip.drip.budget spec); None: the tower's default, as in generate.
    """
    from llava_drip.inspect.tokens import denormalise, draw_boundary_map
    if not isinstance(tower, DRIPVisionTower):
        return None
    drip = tower.vision_tower
    feats = drip.forward_features(pixel_values.to(tower.dtype), budget=tower.budget if budget is None else budget)
    groups = int(feats.num_groups[0])
    segments = segments_from_boundaries(feats.boundaries[0], groups)
    crop = denormalise(pixel_values[0], image_processor.image_mean, image_processor.image_std)
    grid = (int(drip.grid_size[0]), int(drip.grid_size[1]))
    text = f"{groups} segments / {drip.num_patches} patches" if label else None
    return draw_boundary_map(crop, segments, grid, size=size, label=text)

"""CSV rows checked before training: open_clip_train's CsvDataset opens each image lazily and a
missing or broken file kills the run mid-epoch (inside a DataLoader worker).

`CheckedCsvDataset` subclasses it, decodes every image once up front, drops the rows that fail
and remembers each by line, path and reason. Dropping happens before the DataLoader and the
DistributedSampler are built, so batch counts and the LR schedule see the filtered size. Each rank
decodes its own share of the rows (in a thread pool: PIL releases the GIL while decoding) and the
ranks exchange what failed, so every rank drops the same rows and no file is decoded twice.
"""
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

import torch.distributed as dist

import pandas as pd
from open_clip_train.data import CsvDataset

from llava_drip.image_io import ImageError, open_image

_logger = logging.getLogger(__name__)


def _caption_problem(caption) -> str:
    if caption is None or (isinstance(caption, float) and math.isnan(caption)):
        return "empty caption"
    if not str(caption).strip():
        return "empty caption"
    return ""


def _image_problem(path) -> str:
    if path is None or (isinstance(path, float) and math.isnan(path)) or not str(path).strip():
        return "empty image path"
    path = str(path)
    if not os.path.isfile(path):
        return "missing image"
    try:
        open_image(path)  # full decode: a truncated file opens but fails here, as it would in training
    except ImageError as e:
        return f"unreadable image ({e})"
    return ""


class CheckedCsvDataset(CsvDataset):
    def __init__(self, input_filename, transforms, img_key, caption_key, sep="\t", tokenizer=None):
        if not os.path.isfile(input_filename):
            raise FileNotFoundError(f"CSV not found: {input_filename}")
        columns = list(pd.read_csv(input_filename, sep=sep, nrows=0).columns)
        for key, flag in ((img_key, "--csv-img-key"), (caption_key, "--csv-caption-key")):
            if key not in columns:
                raise ValueError(f"{input_filename}: no column {key!r} (columns: {columns}, separator {sep!r}); "
                                 f"set {flag} or --csv-separator")
        super().__init__(input_filename, transforms, img_key, caption_key, sep=sep, tokenizer=tokenizer)
        self.source = input_filename
        self.num_rows = len(self.images)
        self.bad_rows: List[Dict] = self._find_bad_rows()
        bad = {r["line"] - 2 for r in self.bad_rows}  # line 1 is the header
        keep = [i for i in range(self.num_rows) if i not in bad]
        self.images = [self.images[i] for i in keep]
        self.captions = [self.captions[i] for i in keep]
        if not self.images:
            first = self.bad_rows[0] if self.bad_rows else {}
            raise ValueError(f"{input_filename}: none of its {self.num_rows} rows is usable "
                             f"(first: line {first.get('line')}, {first.get('image')}: {first.get('reason')})")
        if self.bad_rows:
            _logger.warning(f"{input_filename}: skipping {len(self.bad_rows)} of {self.num_rows} rows: "
                            + "; ".join(f"{r['image']} ({r['reason']})" for r in self.bad_rows[:5])
                            + (" ..." if len(self.bad_rows) > 5 else ""))

    def __getitem__(self, idx):
        # open_clip's own __getitem__ is Image.open + convert: read as every other path of the project does
        return self.transforms(open_image(str(self.images[idx]))), self.tokenize([str(self.captions[idx])])[0]

    def _find_bad_rows(self) -> List[Dict]:
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        mine = range(rank, self.num_rows, world)

        def check(i):
            return _caption_problem(self.captions[i]) or _image_problem(self.images[i])

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            problems = list(pool.map(check, mine))
        bad = [{"line": i + 2, "image": None if self.images[i] is None else str(self.images[i]), "reason": p}
               for i, p in zip(mine, problems) if p]
        if distributed:
            shards = [None] * world
            dist.all_gather_object(shards, bad)
            bad = [r for shard in shards for r in shard]
        return sorted(bad, key=lambda r: r["line"])

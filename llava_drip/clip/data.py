"""CSV rows checked before training: open_clip_train's CsvDataset opens each image lazily and a
missing or broken file kills the run mid-epoch (inside a DataLoader worker).

`CheckedCsvDataset` subclasses it, decodes every image once up front, drops the rows that fail
and remembers each by line, path and reason. Dropping happens before the DataLoader and the
DistributedSampler are built, so batch counts and the LR schedule see the filtered size, and every
rank filters the same rows.
"""
import logging
import math
import os
from typing import Dict, List

import pandas as pd
from open_clip_train.data import CsvDataset
from PIL import Image

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
        with Image.open(path) as im:
            im.load()  # full decode: a truncated file passes Image.open but fails here, as it would in training
    except Exception as e:  # PIL raises many types for bad files
        return f"unreadable image ({type(e).__name__}: {e})"
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
        self.bad_rows: List[Dict] = []
        images, captions = [], []
        for i, (img, cap) in enumerate(zip(self.images, self.captions)):
            problem = _caption_problem(cap) or _image_problem(img)
            if problem:
                # line 1 is the header
                self.bad_rows.append({"line": i + 2, "image": None if img is None else str(img), "reason": problem})
            else:
                images.append(img)
                captions.append(cap)
        self.images, self.captions = images, captions
        if not images:
            first = self.bad_rows[0] if self.bad_rows else {}
            raise ValueError(f"{input_filename}: none of its {self.num_rows} rows is usable "
                             f"(first: line {first.get('line')}, {first.get('image')}: {first.get('reason')})")
        if self.bad_rows:
            _logger.warning(f"{input_filename}: skipping {len(self.bad_rows)} of {self.num_rows} rows: "
                            + "; ".join(f"{r['image']} ({r['reason']})" for r in self.bad_rows[:5])
                            + (" ..." if len(self.bad_rows) > 5 else ""))

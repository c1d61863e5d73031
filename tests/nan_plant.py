"""Fault injection for the non-finite guard tests: `train.py` with NaN images planted in chosen samples.

Run like train.py (also under the deepspeed launcher). LLAVA_DRIP_NAN_CALLS lists the dataset fetches
(0-based, counted per process) whose image becomes all-NaN; LLAVA_DRIP_NAN_RANK limits it to one rank.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llava_drip.train import data, train  # noqa: E402


def plant(calls, rank=None):
    real = data.LazySupervisedDataset.__getitem__
    count = [0]

    def getitem(self, i):
        item = real(self, i)
        k, count[0] = count[0], count[0] + 1
        here = rank is None or int(os.environ.get("RANK", "0")) == rank
        if here and k in calls and "image" in item:
            item["image"] = item["image"].clone().fill_(float("nan"))
        return item

    data.LazySupervisedDataset.__getitem__ = getitem
    return real


if __name__ == "__main__":
    calls = {int(c) for c in os.environ["LLAVA_DRIP_NAN_CALLS"].split(",") if c}
    rank = os.environ.get("LLAVA_DRIP_NAN_RANK")
    plant(calls, None if rank in (None, "") else int(rank))
    train.main()

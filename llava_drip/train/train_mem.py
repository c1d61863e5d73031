"""LLaVA's `train_mem.py` entry: train.py with FlashAttention-2 where it can run (CUDA and flash_attn
installed), else PyTorch's SDPA, so LLaVA's scripts that launch train_mem.py run unchanged.

    deepspeed llava_drip/train/train_mem.py --deepspeed scripts/zero2.json ...
"""
import importlib.util
import pathlib
import sys

if __package__ in (None, ""):  # run as a script by the deepspeed launcher
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import torch


def default_attn_implementation() -> str:
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


if __name__ == "__main__":
    from llava_drip.train.train import main
    main(attn_implementation=default_attn_implementation())

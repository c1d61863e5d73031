"""load_pretrained_model: LLaVA's loader, dispatching on what the folder holds (never on its name).

A folder is one of
- a full model:   config.json (model_type llava_llama) + model*.safetensors
- LoRA + base:    adapter_config.json + non_lora_trainables.safetensors (+ config.json); LLM from model_base
- projector only: mm_projector.bin / .safetensors + config.json (stage 1); LLM from model_base
"""
import json
import logging
import os
from typing import Optional

import torch

from llava_drip.model import LlavaConfig, LlavaLlamaForCausalLM

_logger = logging.getLogger(__name__)

PROJECTOR_FILES = ("mm_projector.safetensors", "mm_projector.bin")


def _load_tensors(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_projector_weights(projector: torch.nn.Module, path: str):
    """Load mm_projector.bin / .safetensors (LLaVA keys `model.mm_projector.*`) strictly."""
    if os.path.isdir(path):
        found = [os.path.join(path, f) for f in PROJECTOR_FILES if os.path.isfile(os.path.join(path, f))]
        if not found:
            raise FileNotFoundError(f"no {' or '.join(PROJECTOR_FILES)} in {path}")
        path = found[0]
    sd = _load_tensors(path)
    prefix = next((p for p in ("model.mm_projector.", "mm_projector.") if any(k.startswith(p) for k in sd)), "")
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    result = projector.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"{path}: projector keys do not match: missing {result.missing_keys}, "
                           f"unexpected {result.unexpected_keys}")


def _load_strict_subset(model: torch.nn.Module, sd: dict, path: str, expected_prefixes):
    """Load a partial state dict; every key must exist in the model and all expected modules be covered."""
    own = model.state_dict()
    unexpected = [k for k in sd if k not in own]
    missing = [k for k in own if k.startswith(expected_prefixes) and k not in sd]
    if unexpected or missing:
        raise RuntimeError(f"{path}: unexpected keys {unexpected[:8]}, missing keys {missing[:8]}")
    model.load_state_dict(sd, strict=False)


def _tokenizer(path: str):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token  # LLaVA's choice for Llama/Vicuna
    return tok


def load_pretrained_model(model_path: str, model_base: Optional[str] = None, model_name: Optional[str] = None,
                          device: str = "cpu", torch_dtype: Optional[torch.dtype] = None, **unused):
    """Return (tokenizer, model, image_processor, context_len) as LLaVA's builder does.

    model_name is accepted for LLaVA compatibility and ignored: the folder's files decide.
    """
    if not os.path.isdir(model_path):
        raise FileNotFoundError(f"model folder not found: {model_path}")
    files = set(os.listdir(model_path))
    torch_dtype = torch_dtype or torch.float32
    if "adapter_config.json" in files:
        kind = "lora"
    elif any(f.startswith("model") and f.endswith(".safetensors") for f in files):
        kind = "full"
    elif any(f in files for f in PROJECTOR_FILES):
        kind = "projector"
    else:
        raise ValueError(f"{model_path}: neither a full model, a LoRA adapter nor a projector checkpoint "
                         f"(files: {sorted(files)[:10]})")
    if kind != "full":
        if model_base is None:
            model_base = _base_from_folder(model_path)
        if model_base is None:
            raise ValueError(f"{model_path} holds a {kind} checkpoint: pass model_base (the base LLM folder)")

    if kind == "full":
        tokenizer = _tokenizer(model_path)
        model = LlavaLlamaForCausalLM.from_pretrained(model_path, torch_dtype=torch_dtype)
    else:
        cfg = LlavaConfig.from_pretrained(model_path)
        tokenizer = _tokenizer(model_path if "tokenizer_config.json" in files else model_base)
        model = LlavaLlamaForCausalLM.from_pretrained(model_base, config=cfg, torch_dtype=torch_dtype)
        if kind == "projector":
            # the tower comes from the checkpoint its config names; the projector from this folder
            model.get_model().vision_tower = _tower_with_weights(cfg)
            load_projector_weights(model.get_model().mm_projector, model_path)
        else:
            path = os.path.join(model_path, "non_lora_trainables.safetensors")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing: a LoRA folder must hold the projector and tower")
            _load_strict_subset(model, _load_tensors(path), path, ("model.mm_projector.", "model.vision_tower."))
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, model_path)
            model = model.merge_and_unload()
    model.to(device=device, dtype=torch_dtype)
    model.eval()
    image_processor = model.get_vision_tower().image_processor
    context_len = getattr(model.config, "max_position_embeddings", 2048)
    return tokenizer, model, image_processor, context_len


def _tower_with_weights(cfg):
    from .multimodal_encoder.builder import build_vision_tower
    if cfg.mm_vision_tower_type != "hf_clip" and not cfg.mm_vision_tower_pretrained:
        raise ValueError("the config names no mm_vision_tower_pretrained checkpoint for the tower")
    return build_vision_tower(cfg, load_weights=True)


def _base_from_folder(model_path: str) -> Optional[str]:
    """The base LLM recorded at training time (adapter_config or our training record), if still present."""
    for name, key in (("adapter_config.json", "base_model_name_or_path"), ("llava_drip_train.json", "model_name_or_path")):
        p = os.path.join(model_path, name)
        if os.path.isfile(p):
            base = json.load(open(p)).get(key)
            if base and os.path.isdir(base):
                return base
    return None

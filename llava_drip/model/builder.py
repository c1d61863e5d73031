"""load_pretrained_model: LLaVA's loader, dispatching on what the folder holds (never on its name).

A folder is one of (this project's names and LLaVA's)
- a full model:   config.json (model_type llava_llama, llava_qwen, llava_mistral or LLaVA's llava)
                  + model*.safetensors / pytorch_model*.bin
- LoRA + base:    adapter_config.json + non_lora_trainables.{bin,safetensors} + config.json; LLM from model_base
- projector only: mm_projector.bin / .safetensors + config.json (stage 1); LLM from model_base
Every load is strict: a missing or unexpected weight is an error naming the folder and the keys, except
- a tower the folder leaves out entirely, loaded from its source (LLaVA's HF CLIP id, or this project's
  clip-train checkpoint); a tower the folder holds only part of is refused,
- a DRIP tower's calibration buffers (folders from before calibration existed): left uncalibrated,
- what transformers itself rebuilds (tied lm_head under tie_word_embeddings, rotary inv_freq, position_ids).
``load_pretrained_model(..., strict=False)`` (the name drip.factory.load_checkpoint uses) loads such a
folder anyway, with the keys in a warning; missing weights then keep their random initialisation.
The folder's config.json model_type picks the LLM class (llava_qwen: Qwen2, llava_mistral: Mistral,
anything else: Llama), for LoRA and projector folders too, whose base LLM folder is a plain HF one.
"""
import json
import logging
import os
import re
from typing import Optional

import torch

from llava_drip.model import LLAVA_CLASSES, folder_model_type, llava_classes

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
    own = projector.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})" for k, v in sd.items()
             if k in own and v.shape != own[k].shape]
    if wrong:
        raise RuntimeError(f"{path}: projector shapes do not match: {', '.join(wrong)}; it was trained for another "
                           "tower width, LLM or --mm_vision_token_pos")
    result = projector.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"{path}: projector keys do not match: missing {result.missing_keys}, "
                           f"unexpected {result.unexpected_keys}")


WEIGHT_FILES = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")
# buffers that older transformers saved and current ones rebuild: never a reason to refuse a checkpoint
_REBUILT_BUFFERS = ("rotary_emb.inv_freq", "embeddings.position_ids")
_TOWER, _PROJECTOR = "model.vision_tower.", "model.mm_projector."
# DRIP calibration state (drip/tower.py), absent from folders saved before calibration existed
_CALIB_BUFFERS = (".calib_quantiles", ".calib_target")
_SHOW_KEYS = 8  # keys listed per kind in a mismatch message; the count gives the rest


def resolve_dtype(name: str, device: str, cuda_auto: torch.dtype = torch.bfloat16) -> torch.dtype:
    """A --dtype flag's value as a torch dtype. 'auto': `cuda_auto` on CUDA, fp32 elsewhere (CPU
    matmuls in half precision are slow or unsupported)."""
    if name == "auto":
        return cuda_auto if str(device).startswith("cuda") else torch.float32
    table = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"dtype {name!r}: expected one of auto, {', '.join(table)}")
    return table[name]


def checkpoint_kind(files) -> Optional[str]:
    """'lora', 'full' or 'projector' from a folder's file names (LLaVA's and this project's names)."""
    if "adapter_config.json" in files:
        return "lora"
    if any(WEIGHT_FILES.fullmatch(f) for f in files):
        return "full"
    if any(f in files for f in PROJECTOR_FILES):
        return "projector"
    return None


def _weights_mismatch(path: str, missing, unexpected=(), mismatched=(), strict: bool = True, why: str = ""):
    """Refuse (strict) or warn about weights that do not match; a no-op when there are none."""
    if not (missing or unexpected or mismatched):
        return
    missing, unexpected, mismatched = sorted(missing), sorted(unexpected), sorted(map(str, mismatched))
    msg = (f"{path}: weights do not match the model{why}: missing {missing[:_SHOW_KEYS]} ({len(missing)}), "
           f"unexpected {unexpected[:_SHOW_KEYS]} ({len(unexpected)}), mismatched {mismatched[:4]}")
    if strict:
        raise RuntimeError(msg + "; load_pretrained_model(..., strict=False) loads it anyway, "
                                 "missing weights left randomly initialised")
    _logger.warning("%s; loading anyway (strict=False): missing weights are randomly initialised, "
                    "unexpected ones dropped", msg)


def _from_pretrained(path: str, cfg, torch_dtype, allow_missing=(), strict: bool = True):
    """from_pretrained that refuses missing / unexpected weights, except missing ones under allow_missing.

    Returns the model and every missing key (allowed ones included), for the caller to settle those.
    """
    model_cls = LLAVA_CLASSES[type(cfg).model_type][1]  # the class's: LLaVA's own folders say 'llava'
    model, info = model_cls.from_pretrained(path, config=cfg, torch_dtype=torch_dtype, output_loading_info=True)
    # transformers already drops tied weights (lm_head under tie_word_embeddings) from missing_keys
    unexpected = [k for k in info["unexpected_keys"] if not k.endswith(_REBUILT_BUFFERS)]
    missing = [k for k in info["missing_keys"] if not k.startswith(tuple(allow_missing))]
    _weights_mismatch(path, missing, unexpected, info.get("mismatched_keys") or (), strict)
    return model, set(info["missing_keys"])


def _settle_tower(model, missing: set, path: str, cfg, strict: bool = True):
    """A folder holds the whole tower (maybe without DRIP calibration), or none of it: then load it from its source.

    Part of a tower is refused: swapping in the source's tower would silently drop the folder's trained
    tower weights, and keeping it would run the gaps on random weights.
    """
    gone = {k for k in missing if k.startswith(_TOWER)}
    if not gone:
        return
    held = {k for k in model.state_dict() if k.startswith(_TOWER)} - gone
    if not held:  # LLaVA folders may leave the tower to its source
        model.get_model().vision_tower = _tower_with_weights(cfg)
        return
    calib = {k for k in gone if k.endswith(_CALIB_BUFFERS)}
    _weights_mismatch(path, gone - calib, strict=strict, why=" (the vision tower is only partly in the folder)")
    if calib:
        # as drip/tower.py does for pre-calibration clip checkpoints: uncalibrated, never uninitialised memory
        for owner in {k.rsplit(".", 1)[0] for k in calib}:
            tower = model.get_submodule(owner)
            tower.calib_quantiles.fill_(float("nan"))
            tower.calib_target.fill_(float(tower.prior))
        _logger.info("%s: DRIP tower without calibration: 'calibrated' boundaries fall back to 'threshold' "
                     "(logit > 0) until `llava-drip calibrate` is run", path)


def _non_lora_trainables(model_path: str) -> dict:
    """non_lora_trainables.{safetensors,bin} with LLaVA's key prefixes (base_model.model.) removed."""
    for name in ("non_lora_trainables.safetensors", "non_lora_trainables.bin"):
        path = os.path.join(model_path, name)
        if os.path.isfile(path):
            sd = _load_tensors(path)
            sd = {(k[len("base_model.model."):] if k.startswith("base_model.model.") else k): v for k, v in sd.items()}
            if any(k.startswith("model.model.") for k in sd):  # an older LLaVA naming
                sd = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in sd.items()}
            return sd
    raise FileNotFoundError(f"{model_path}: a LoRA folder needs non_lora_trainables.bin (or .safetensors) "
                            "holding the projector")


def _load_part(model: torch.nn.Module, sd: dict, prefix: str, path: str) -> bool:
    """Load the tensors under `prefix` strictly; False when `sd` holds none of them."""
    part = {k: v for k, v in sd.items() if k.startswith(prefix)}
    if not part:
        return False
    own = {k for k in model.state_dict() if k.startswith(prefix)}
    missing, unexpected = sorted(own - set(part)), sorted(set(part) - own)
    if missing or unexpected:
        raise RuntimeError(f"{path}: {prefix}* keys do not match: missing {missing[:8]}, unexpected {unexpected[:8]}")
    model.load_state_dict(part, strict=False)
    return True


def _llava_config(path: str):
    """The folder's config as our config class for its LLM (LLaVA's own Llama folders say 'llava' or 'llava_llama')."""
    cfg = llava_classes(folder_model_type(path))[0].from_pretrained(path)
    if not getattr(cfg, "mm_vision_tower", None):
        raise ValueError(f"{path}/config.json names no mm_vision_tower: not a LLaVA checkpoint")
    return cfg


def _tokenizer(path: str):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        # LLaVA's choice for Llama/Vicuna; a byte-level BPE without unk (Qwen-like) pads with its eos
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def load_pretrained_model(model_path: str, model_base: Optional[str] = None, model_name: Optional[str] = None,
                          load_8bit: bool = False, load_4bit: bool = False, device_map=None, device: str = "cpu",
                          torch_dtype: Optional[torch.dtype] = None, strict: bool = True, **unused):
    """Return (tokenizer, model, image_processor, context_len) as LLaVA's builder does.

    strict (default): a missing or unexpected weight in the folder (or in model_base) is a RuntimeError
    naming the folder and the keys. strict=False loads it anyway, with the keys in a warning.

    model_name is accepted for LLaVA compatibility and ignored: the folder's files decide. Reads this
    project's folders and LLaVA's (config model_type 'llava' / 'llava_llama', pytorch_model*.bin shards,
    non_lora_trainables.bin, a tower left out of the weights and loaded from mm_vision_tower).
    """
    if load_8bit or load_4bit:
        raise ValueError("load_8bit / load_4bit need bitsandbytes on CUDA, which this project does not support yet")
    model_path = _local_folder(model_path)
    files = set(os.listdir(model_path))
    torch_dtype = torch_dtype or torch.float32
    kind = checkpoint_kind(files)
    if kind is None:
        raise ValueError(f"{model_path}: neither a full model, a LoRA adapter nor a projector checkpoint "
                         f"(files: {sorted(files)[:10]})")
    if kind != "full":
        if model_base is None:
            model_base = _base_from_folder(model_path)
        if model_base is None:
            raise ValueError(f"{model_path} holds a {kind} checkpoint: pass model_base (the base LLM folder)")
        model_base = _local_folder(model_base)

    cfg = _llava_config(model_path)
    if kind == "full":
        tokenizer = _tokenizer(model_path)
        model, missing = _from_pretrained(model_path, cfg, torch_dtype, allow_missing=(_TOWER,), strict=strict)
        _settle_tower(model, missing, model_path, cfg, strict=strict)
    else:
        tokenizer = _tokenizer(model_path if "tokenizer_config.json" in files else model_base)
        model, _ = _from_pretrained(model_base, cfg, torch_dtype, allow_missing=(_TOWER, _PROJECTOR), strict=strict)
        if kind == "projector":
            # the tower comes from its source (checkpoint or HF folder); the projector from this folder
            model.get_model().vision_tower = _tower_with_weights(cfg)
            load_projector_weights(model.get_model().mm_projector, model_path)
        else:
            sd = _non_lora_trainables(model_path)
            if not _load_part(model, sd, _PROJECTOR, model_path):
                raise RuntimeError(f"{model_path}: non_lora_trainables holds no {_PROJECTOR}* weights")
            if not _load_part(model, sd, _TOWER, model_path):
                model.get_model().vision_tower = _tower_with_weights(cfg)
            stray = [k for k in sd if not k.startswith((_PROJECTOR, _TOWER))]
            if stray:
                raise RuntimeError(f"{model_path}: non_lora_trainables holds unexpected keys {stray[:8]}")
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, model_path)
            model = model.merge_and_unload()
    model.to(device=device, dtype=torch_dtype)
    model.eval()
    image_processor = model.get_vision_tower().image_processor
    context_len = getattr(model.config, "max_sequence_length", None) or getattr(model.config, "max_position_embeddings", 2048)
    return tokenizer, model, image_processor, context_len


def _local_folder(path: str) -> str:
    """A folder as given, or an HF hub id (owner/name) fetched into the hub cache when a hub is reachable."""
    if os.path.isdir(path):
        return path
    from .multimodal_encoder.builder import _HUB_ID
    if not _HUB_ID.fullmatch(path):
        raise FileNotFoundError(f"model folder not found: {path}")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(path)
    except Exception as e:  # offline, unknown id, gated repo: one message that names the id
        raise FileNotFoundError(f"model folder not found: {path}, and it could not be fetched from the hub as "
                                f"a model id ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


def _tower_with_weights(cfg):
    from .multimodal_encoder.builder import build_vision_tower, resolve_tower_type
    kind = resolve_tower_type(cfg.mm_vision_tower, getattr(cfg, "mm_vision_tower_type", "auto"))
    if kind != "hf_clip" and not getattr(cfg, "mm_vision_tower_pretrained", None):
        raise ValueError(f"the config's {kind} tower {cfg.mm_vision_tower!r} names no mm_vision_tower_pretrained "
                         "checkpoint, and the folder does not hold its weights")
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

"""`llava-drip convert-reference`: a checkpoint of the reference DRIP code (github.com/Yusen-Peng/DRIP,
the v1 `DTPViT` tower in `src/open_clip_local/DTP_ViT.py` inside its open_clip 2.32 `CLIP`) -> this
project's DRIPCLIP weights, as one safetensors file that loads strictly.

    llava-drip convert-reference epoch_10.pt --model DRIP-4x-32 --out drip-4x-32.safetensors

Key mapping (reference -> ours; `visual.` prefix on both sides for a full CLIP checkpoint):

    patch_embed.proj.weight              -> conv1.weight
    patch_embed.proj.bias                -> added to positional_embedding[1:] (exact: both are per-patch constants)
    cls_token [1, 1, D]                  -> class_embedding [D]
    pos_embed [1, 1+N, D]                -> positional_embedding [1+N, D]
    pre_blocks.i / shorten_blocks.i      -> pre_blocks.i / post_blocks.i, with
        norm1, norm2                     ->   ln_1, ln_2
        attn.{in_proj_*,out_proj.*}      ->   attn.{in_proj_*,out_proj.*} (both nn.MultiheadAttention)
        mlp.0, mlp.3                     ->   mlp.c_fc, mlp.c_proj
    boundary_predictor.boundary_predictor.0 / .2 -> boundary_predictor.fc1 / fc2
    norm (one LayerNorm used twice)      -> ln_post, with shared_norm=True
    head.weight [E, D]                   -> proj [D, E] (transposed)
    head.bias [E]                        -> proj_bias [E], with proj_bias=True
    null_group                           -> dropped (v1 prepends it and removes it at once)
    text tower, logit_scale              -> one to one (the reference's text side is open_clip's)

The reference has no LayerNorm before its pre blocks and a bias on its head; the converted model is
built with `ln_pre=False` (no ln_pre at all) and `proj_bias=True`, so it computes the reference's
forward exactly. Any other key without a place, or a project key the checkpoint lacks, stops the
conversion with a list; `--allow-unmapped` goes on (missing keys keep a fresh initialisation, and
the outputs are then not the reference's). The reference-parity flags (docs/drip.md) go into the
file's metadata with the model name; `load_converted` reads them back.

The parser is built before torch is imported, so `--help` stays fast.
"""
import argparse
import json
import logging
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

_logger = logging.getLogger(__name__)

SOURCE = "Yusen-Peng/DRIP DTPViT v1 (src/open_clip_local/DTP_ViT.py)"
# the reference's semantics as drip_cfg flags (docs/drip.md); predictor_hidden_mult and proj_bias are read
# from the weights
REFERENCE_FLAGS = {
    "pad_mask": False, "reference_mean": True, "cover_tail": False, "shared_norm": True, "ln_pre": False,
    "pool_type": "mean_incl_cls", "eval_mode": "sample", "temperature": 0.5,
    "logit_clamp": 20.0, "prob_clamp": 1e-4, "attn_impl": "padded",
}
# wrappers training scripts put around a state dict
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_BLOCK_PARTS = {"norm1.": "ln_1.", "norm2.": "ln_2.", "attn.": "attn.", "mlp.0.": "mlp.c_fc.", "mlp.3.": "mlp.c_proj."}
# project keys the reference cannot hold and that start fresh without harm
_NEW_BUFFERS = ("visual.calib_quantiles", "visual.calib_target")
# without these there is nothing to convert, --allow-unmapped or not
_CORE = re.compile(r"visual\.(conv1|class_embedding|positional_embedding|proj|pre_blocks|post_blocks|"
                   r"boundary_predictor|ln_post)\b")


class ConversionError(ValueError):
    """The checkpoint does not map onto the model; `report` says which keys and why."""

    def __init__(self, message: str, report: Optional["ConversionReport"] = None):
        super().__init__(message)
        self.report = report


@dataclass
class ConversionReport:
    model: str
    kind: str  # "clip": a full CLIP checkpoint; "tower": the DTPViT alone
    drip_cfg: Dict[str, object]
    mapped: Dict[str, str] = field(default_factory=dict)  # ours -> reference
    folded: List[str] = field(default_factory=list)  # exact rewrites beyond renaming
    ignored: Dict[str, str] = field(default_factory=dict)  # reference keys dropped without loss -> why
    unmapped: Dict[str, str] = field(default_factory=dict)  # reference keys with no place -> why
    missing: Dict[str, str] = field(default_factory=dict)  # our keys the checkpoint lacks -> why
    new: List[str] = field(default_factory=list)  # our buffers that start fresh (calibration)
    notes: List[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def problems(self) -> str:
        lines = []
        if self.unmapped:
            lines.append(f"{len(self.unmapped)} reference key(s) with no place in {self.model}:")
            lines += [f"  {k}: {why}" for k, why in sorted(self.unmapped.items())]
        if self.missing:
            lines.append(f"{len(self.missing)} key(s) of {self.model} missing from the checkpoint:")
            lines += [f"  {k}: {why}" for k, why in sorted(self.missing.items())]
        return "\n".join(lines)


# ---- reading ----------------------------------------------------------------------------------------
def read_reference_checkpoint(path) -> Dict[str, "object"]:
    """A plain {name: tensor} dict from a reference checkpoint: torch.load with weights_only=True (or
    safetensors), unwrapped from {'state_dict': ...} / {'model': ...} and 'module.' prefixes."""
    import pickle

    import torch
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # weights_only refuses arbitrary objects; unpickling them would run code from the file
            raise ConversionError(
                f"{path}: refusing to load it: it holds Python objects beyond tensors and plain containers, "
                f"and it is only read with torch.load(weights_only=True). Re-save just the weights, e.g. "
                f"torch.save(ckpt['state_dict'], 'weights.pt'), where the file came from. ({str(e).splitlines()[0]})"
            ) from None
    # unwrap {'state_dict': {...}, 'epoch': ..., 'optimizer': ...} and the like, outermost first
    while isinstance(sd, dict) and not _all_tensors(sd):
        inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), dict)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, dict):
        raise ConversionError(f"{path}: expected a state dict, got {type(sd).__name__}")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: not a state dict of tensors (no {'/'.join(_WRAPPER_KEYS)} entry holds one); "
                              f"non-tensor entries: {sorted(map(str, bad))[:10]}")
    for prefix in _STRIP_PREFIXES:  # DDP's 'module.', torch.compile's '_orig_mod.', possibly nested
        while sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _all_tensors(d: dict) -> bool:
    import torch
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


# ---- mapping ----------------------------------------------------------------------------------------
def reference_tower_key(key: str) -> Optional[str]:
    """Our tower's name for a reference DTPViT key renamed one to one (no `visual.` prefix), else None.
    The keys that need more than a rename (cls_token, pos_embed, head, the conv bias) are handled apart."""
    m = re.fullmatch(r"(pre_blocks|shorten_blocks)\.(\d+)\.(.+)", key)
    if m:
        stack = "pre_blocks" if m.group(1) == "pre_blocks" else "post_blocks"
        for ref, ours in _BLOCK_PARTS.items():
            if m.group(3).startswith(ref):
                return f"{stack}.{m.group(2)}.{ours}{m.group(3)[len(ref):]}"
        return None
    m = re.fullmatch(r"boundary_predictor\.boundary_predictor\.(0|2)\.(weight|bias)", key)
    if m:
        return f"boundary_predictor.{'fc1' if m.group(1) == '0' else 'fc2'}.{m.group(2)}"
    if key == "patch_embed.proj.weight":
        return "conv1.weight"
    if key in ("norm.weight", "norm.bias"):
        return "ln_post." + key.split(".")[1]
    return None


def _count_blocks(keys, stack: str) -> int:
    idx = [int(m.group(1)) for k in keys for m in [re.match(rf"{stack}\.(\d+)\.", k)] if m]
    return max(idx) + 1 if idx else 0


def _suggest(pre: int, post: int, patch: Optional[int], width: Optional[int]) -> List[str]:
    from .factory import get_model_config, list_models
    out = []
    for name in list_models():
        cfg = get_model_config(name)
        d, v = cfg.get("drip_cfg"), cfg["vision_cfg"]
        if d and d["pre_layers"] == pre and d["post_layers"] == post and \
                (patch is None or v["patch_size"] == patch) and (width is None or v["width"] == width):
            out.append(name)
    return out


def _structure(tower_sd: dict, model_name: str) -> dict:
    """What the reference tower's weights say about its shape, checked against the named config.
    Returns the drip_cfg flags the weights decide (predictor_hidden_mult, proj_bias)."""
    from .factory import get_model_config
    cfg = get_model_config(model_name)
    v, d = cfg["vision_cfg"], cfg["drip_cfg"]
    pre, post = _count_blocks(tower_sd, "pre_blocks"), _count_blocks(tower_sd, "shorten_blocks")
    conv = tower_sd.get("patch_embed.proj.weight")
    patch = int(conv.shape[-1]) if conv is not None and conv.ndim == 4 else None
    width = int(conv.shape[0]) if conv is not None else None
    if any(k.startswith(("shorten_blocks.", "pre_blocks.")) and re.search(r"\.(qkv_net|r_net|o_net|pos_ff)\.", k)
           for k in tower_sd):
        raise ConversionError("this is a later reference tower (Transformer-XL blocks: qkv_net, r_net, ...; "
                              "commit 57186b9 on); only the v1 DTPViT (nn.MultiheadAttention blocks) maps onto this "
                              "project's tower")
    problems = []
    if (pre, post) != (d["pre_layers"], d["post_layers"]):
        names = _suggest(pre, post, patch, width)
        problems.append(f"the checkpoint has {pre} pre + {post} shorten blocks, {model_name} has "
                        f"{d['pre_layers']} + {d['post_layers']}"
                        + (f"; registered names with {pre}+{post}: {', '.join(names)}" if names else ""))
    if patch is not None and patch != v["patch_size"]:
        problems.append(f"the checkpoint's patch size is {patch}, {model_name}'s {v['patch_size']}")
    if width is not None and width != v["width"]:
        problems.append(f"the checkpoint's width is {width}, {model_name}'s {v['width']}")
    if problems:
        raise ConversionError(f"checkpoint does not fit {model_name}: " + "; ".join(problems))
    flags = {}
    fc1 = tower_sd.get("boundary_predictor.boundary_predictor.0.weight")
    if fc1 is not None and width:
        # v1 uses D -> 2D, later versions (and DTP) D -> 4D
        if fc1.shape[0] % width:
            raise ConversionError(f"boundary predictor hidden size {fc1.shape[0]} is not a multiple of width {width}")
        flags["predictor_hidden_mult"] = int(fc1.shape[0] // width)
    # the reference's head is nn.Linear(D, E) with its default bias; a bias-free head maps onto plain proj
    flags["proj_bias"] = "head.bias" in tower_sd
    return flags


def convert_state_dict(ref_sd: dict, model_name: str, allow_unmapped: bool = False, check: bool = True
                       ) -> Tuple[dict, ConversionReport]:
    """Reference state dict -> (our state dict, report). Raises ConversionError on unmapped or missing keys
    (unless allow_unmapped) and always on shape mismatches or a missing core of the tower.
    check: load the result strictly into a freshly built model and run one forward pass."""
    import torch

    from .factory import create_model, get_model_config, is_drip
    if not is_drip(model_name):
        raise ConversionError(f"{model_name} is not a DRIP model (convert-reference needs one of the DRIP-* names)")
    kind = "clip" if any(k.startswith("visual.") for k in ref_sd) else "tower"
    prefix = "visual." if kind == "clip" else ""
    tower_sd = {k[len(prefix):]: v for k, v in ref_sd.items() if k.startswith(prefix)}
    if not any(k.startswith(("patch_embed.", "pre_blocks.", "shorten_blocks.", "cls_token", "pos_embed"))
               for k in tower_sd):
        raise ConversionError("no DTPViT tower keys (patch_embed.*, cls_token, pos_embed, pre_blocks.*, "
                              f"shorten_blocks.*) in the checkpoint; first keys: {sorted(ref_sd)[:8]}")
    flags = {**REFERENCE_FLAGS, **_structure(tower_sd, model_name)}
    model = create_model(model_name, **flags)
    target = model.state_dict()
    if kind == "tower":
        target = {k: v for k, v in target.items() if k.startswith("visual.")}
    report = ConversionReport(model=model_name, kind=kind, drip_cfg=flags)
    prior = get_model_config(model_name)["drip_cfg"]["prior"]
    report.notes.append(f"prior {prior} comes from {model_name}: the reference hard-codes it in model.py, "
                        "the checkpoint does not record it")
    out: Dict[str, torch.Tensor] = {}

    def put(ours: str, value, ref_key: str):
        out[ours] = value
        report.mapped[ours] = ref_key

    conv_bias = None
    for key, value in tower_sd.items():
        ref_key = prefix + key
        if key == "cls_token":
            put("visual.class_embedding", value.reshape(-1), ref_key)
        elif key == "pos_embed":
            put("visual.positional_embedding", value.reshape(value.shape[-2], value.shape[-1]), ref_key)
        elif key == "patch_embed.proj.bias":
            conv_bias = value
        elif key == "head.weight":
            put("visual.proj", value.t(), ref_key)
        elif key == "head.bias":
            put("visual.proj_bias", value.reshape(-1), ref_key)  # proj_bias=True (see _structure)
        elif key == "null_group":
            report.ignored[ref_key] = "unused by v1 (prepended to the groups, then removed)"
        else:
            ours = reference_tower_key(key)
            if ours is None:
                report.unmapped[ref_key] = "no counterpart in this project's tower"
            else:
                put("visual." + ours, value, ref_key)
    if conv_bias is not None:
        pos = out.get("visual.positional_embedding")
        if pos is None:
            report.unmapped[prefix + "patch_embed.proj.bias"] = "no pos_embed to fold it into"
        else:
            # conv(x) + b then + pos  ==  conv_without_bias(x) + (pos + b) on the patch rows
            folded = pos.float().clone()
            folded[1:] += conv_bias.float()
            out["visual.positional_embedding"] = folded.to(pos.dtype)
            report.mapped["visual.positional_embedding"] += f" + {prefix}patch_embed.proj.bias"
            report.folded.append(f"{prefix}patch_embed.proj.bias added to visual.positional_embedding[1:] "
                                 "(our conv1 has no bias)")
    if kind == "clip":  # text tower and logit scale: open_clip's names on both sides
        for key, value in ref_sd.items():
            if key.startswith("visual."):
                continue
            if key in target:
                put(key, value, key)
            else:
                report.unmapped[key] = "no counterpart in this project's CLIP"

    for key in sorted(set(target) - set(out)):
        if key in _NEW_BUFFERS:
            report.new.append(key)
        else:
            report.missing[key] = "not in the checkpoint"
    bad_shapes = [f"{k} <- {report.mapped[k]}: {tuple(v.shape)} vs {tuple(target[k].shape)}"
                  for k, v in out.items() if k in target and tuple(v.shape) != tuple(target[k].shape)]
    if bad_shapes:
        raise ConversionError(f"shape mismatch against {model_name}:\n  " + "\n  ".join(bad_shapes), report)
    core = [k for k in report.missing if _CORE.match(k)]
    if core:
        raise ConversionError(f"the checkpoint lacks the core of the tower ({len(core)} keys, e.g. {core[:4]}); "
                              "nothing sensible can be built from it\n" + report.problems(), report)
    if (report.unmapped or report.missing) and not allow_unmapped:
        raise ConversionError(report.problems() + "\npass --allow-unmapped (allow_unmapped=True) to convert anyway",
                              report)
    for key in report.missing:
        out[key] = target[key]  # the freshly built model's initialisation
    for key in report.new:
        out[key] = target[key]
    if report.missing or report.unmapped:
        report.notes.append("converted with --allow-unmapped: the model's outputs differ from the reference's")
    out = {k: v.contiguous() for k, v in out.items()}
    if check:
        _check(model, out, kind)
    return out, report


def _check(model, sd: dict, kind: str):
    """Strict load into the model the flags build, then one forward pass: the file is usable before it is written."""
    import torch
    if kind == "clip":
        model.load_state_dict(sd, strict=True)
    else:
        model.visual.load_state_dict({k[len("visual."):]: v for k, v in sd.items()}, strict=True)
    model.eval()
    size = model.visual.image_size
    with torch.no_grad():
        feats = model.encode_image(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)))
    if not torch.isfinite(feats).all():
        raise ConversionError("the converted model gives non-finite image features")


def convert_reference(checkpoint, model_name: str, out, allow_unmapped: bool = False, check: bool = True
                      ) -> ConversionReport:
    """Convert a reference checkpoint and write it atomically to `out` (safetensors) with the model name and
    the drip_cfg flags in its metadata."""
    from llava_drip.utils import atomic_save_tensors
    ref_sd = read_reference_checkpoint(checkpoint)
    sd, report = convert_state_dict(ref_sd, model_name, allow_unmapped=allow_unmapped, check=check)
    atomic_save_tensors(sd, out, metadata={
        "model": model_name, "source": os.path.abspath(str(checkpoint)), "converted_from": SOURCE,
        "kind": report.kind, "drip_cfg": json.dumps(report.drip_cfg, sort_keys=True),
        "unmapped": json.dumps(sorted(report.unmapped)), "missing": json.dumps(sorted(report.missing)),
    })
    return report


def converted_metadata(path) -> dict:
    """{'model', 'kind', 'drip_cfg', ...} of a convert-reference output."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if "drip_cfg" not in meta or "model" not in meta:
        raise ValueError(f"{path} was not written by convert-reference (no model / drip_cfg in its metadata)")
    meta["drip_cfg"] = json.loads(meta["drip_cfg"])
    return meta


def load_converted(path, **overrides):
    """The DRIPCLIP a convert-reference file describes, loaded strictly; overrides win over its flags
    (e.g. eval_mode='topk'). A tower-only file fills model.visual; the text tower stays untrained."""
    from .factory import create_model, load_state_dict
    meta = converted_metadata(path)
    kwargs = {**meta["drip_cfg"], **overrides}
    if meta.get("kind", "clip") == "clip":
        return create_model(meta["model"], pretrained=str(path), **kwargs)
    model = create_model(meta["model"], **kwargs)
    sd = load_state_dict(path)
    model.visual.load_state_dict({k[len("visual."):]: v for k, v in sd.items()}, strict=True)
    _logger.warning("%s holds the image tower only: the text tower is randomly initialised", path)
    return model


# ---- command line -------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llava-drip convert-reference",
        description="convert a checkpoint of the reference DRIP code (Yusen-Peng/DRIP, v1 DTPViT) into this "
                    "project's weights (safetensors; model name and reference-parity flags in its metadata)")
    p.add_argument("checkpoint", help="reference checkpoint: open_clip_train's epoch_N.pt, a state dict, "
                                      "or the DTPViT tower's state dict (read with weights_only=True)")
    p.add_argument("--model", required=True, help="DRIP config whose sizes match it, e.g. DRIP-4x-32 or "
                                                  "DRIP-4x-16-4+8 (`llava-drip models`)")
    p.add_argument("--out", required=True, help="output .safetensors (written atomically)")
    p.add_argument("--allow-unmapped", action="store_true",
                   help="convert even with reference keys that have no place or project keys the checkpoint "
                        "lacks (both are listed; outputs then differ from the reference's)")
    p.add_argument("--no-check", action="store_true", help="skip the strict load + forward pass before writing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _summary(report: ConversionReport, out: str) -> str:
    what = "full CLIP" if report.kind == "clip" else "image tower only"
    lines = [f"wrote {out}: {report.model} ({what}), {len(report.mapped)} tensors mapped"]
    lines += [f"  folded: {f}" for f in report.folded]
    lines += [f"  dropped: {k}: {why}" for k, why in sorted(report.ignored.items())]
    if report.new:
        lines.append(f"  new: {', '.join(report.new)} (uncalibrated; run `llava-drip calibrate`)")
    if report.unmapped or report.missing:
        lines.append("WARNING: " + report.problems().replace("\n", "\nWARNING: "))
    lines += [f"  note: {n}" for n in report.notes]
    flags = ", ".join(f"{k}={v!r}" for k, v in sorted(report.drip_cfg.items()))
    lines.append(f"  flags (in the file's metadata): {flags}")
    lines.append("load: from llava_drip.drip.convert_reference import load_converted; "
                 f"model = load_converted({out!r})")
    if report.kind == "clip":
        lines.append(f"  or: create_model_and_transforms({report.model!r}, pretrained={out!r}, <the flags above>)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        report = convert_reference(args.checkpoint, args.model, args.out, allow_unmapped=args.allow_unmapped,
                                   check=not args.no_check)
    except ConversionError as e:
        print(f"llava-drip convert-reference: {e}", file=sys.stderr)
        if args.json and e.report is not None:
            print(json.dumps({"error": str(e), **e.report.as_dict()}, indent=1))
        return 2
    except RuntimeError as e:  # an unknown model name from the registry
        print(f"llava-drip convert-reference: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.as_dict(), indent=1) if args.json else _summary(report, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

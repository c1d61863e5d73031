"""LLaVA stage 1 (projector) and stage 2 (instruction tuning, full or LoRA) with HF Trainer + DeepSpeed.

Launch as LLaVA users do:
    deepspeed llava_drip/train/train.py --deepspeed scripts/zero2.json --model_name_or_path ... \
        --version plain --data_path ... --image_folder ... --vision_tower DRIP-4x-32 \
        --vision_tower_pretrained runs/clip/epoch_latest.pt --tune_mm_mlp_adapter True ...
"""
import contextlib
import json
import logging
import math
import os
import pathlib
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional

if __package__ in (None, ""):  # `deepspeed llava_drip/train/train.py` runs this file as a script
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import torch
import transformers
from transformers import Trainer

from llava_drip.checkpoints import (UnsafeCheckpointError, atomic_torch_save, llava_checkpoint_problem,
                                    pick_llava_checkpoint)
from llava_drip.conversation import get_conv_template
from llava_drip.model import LLAVA_CLASSES, llava_classes
from llava_drip.utils import atomic_save_tensors
from llava_drip.train.data import (BadSampleLog, DataCollatorForSupervisedDataset, LazySupervisedDataset,
                                   ModalityLengthGroupedSampler)

_logger = logging.getLogger("llava_drip.train")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "base LLM folder (HF format) or a LLaVA checkpoint"})
    version: str = field(default="v1", metadata={
        "help": "conversation template: plain | v1 (vicuna_v1) | qwen_2 (Qwen2/2.5) | mistral_instruct"})
    freeze_backbone: bool = False
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "stage 1: train only the projector"})
    mm_tunable_parts: Optional[str] = field(default=None, metadata={
        "help": "LLaVA-NeXT's: what trains, comma-separated from mm_vision_tower, mm_mlp_adapter, "
                "mm_language_model (default: the projector in stage 1, projector + LLM in stage 2)"})
    vision_tower: Optional[str] = field(default=None, metadata={"help": "DRIP-4x-32, ViT-B-32, or an HF CLIP folder"})
    vision_tower_type: str = field(default="auto", metadata={"help": "drip | open_clip | hf_clip | auto"})
    vision_tower_pretrained: Optional[str] = field(default=None, metadata={"help": "clip-train checkpoint for the tower"})
    mm_vision_select_layer: int = -1
    mm_vision_select_feature: str = "patch"
    mm_vision_token_pos: Optional[str] = field(default=None, metadata={
        "help": "'centroid': append to each visual token a sin/cos code of where it lies in the image (a DRIP "
                "group's mean patch position), so the LLM can tell left from right; default: none, as LLaVA"})
    drip_eval_mode: str = field(default="calibrated", metadata={
        "help": "DRIP boundaries for LLaVA: calibrated (the tower's calibrated cut; threshold if uncalibrated) | "
                "threshold | topk | sample"})
    drip_budget: Optional[str] = field(default=None, metadata={
        "help": "default DRIP tokens per image, saved in the config: 0.25 (ratio), 16 (count), mean:0.25"})
    drip_train_budgets: Optional[str] = field(default=None, metadata={
        "help": "comma-separated budgets; each image sample draws one, so one model serves any budget "
                "(e.g. 1.0,0.5,0.25,0.1 or mean:0.25,mean:0.1)"})
    pretrain_mm_mlp_adapter: Optional[str] = field(default=None, metadata={"help": "stage-1 mm_projector.bin"})
    mm_projector_type: str = "linear"
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    attn_implementation: Optional[str] = field(default=None, metadata={"help": "eager | sdpa | flash_attention_2"})


@dataclass
class DataArguments:
    data_path: str = field(default=None, metadata={"help": "LLaVA JSON data"})
    lazy_preprocess: bool = True
    is_multimodal: bool = False
    image_folder: Optional[str] = None
    image_aspect_ratio: str = "square"
    image_grid_pinpoints: Optional[str] = None  # LLaVA-NeXT's anyres; refused
    strict: bool = field(default=False, metadata={"help": "raise on the first bad sample instead of skipping it"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(default=2048, metadata={"help": "max tokens per sample, visual tokens included"})
    group_by_modality_length: bool = False
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_bias: str = "none"
    mm_projector_lr: Optional[float] = None
    mm_vision_tower_lr: Optional[float] = None
    freeze_mm_mlp_adapter: bool = False
    remove_unused_columns: bool = False
    bits: int = 16
    max_skipped_steps: int = field(default=10, metadata={
        "help": "stop after this many consecutive micro-batches with a non-finite loss (each is skipped: no "
                "backward, no optimizer step)"})


# Flags LLaVA-1.5's scripts pass that transformers 5 renamed: old name -> new name.
RENAMED_FLAGS = {"--warmup_ratio": "--warmup_steps",  # a float in [0, 1) is a ratio there
                 "--evaluation_strategy": "--eval_strategy"}
MULTIMODAL_MODULES = ("mm_projector", "vision_tower", "vision_resampler")


class ArgumentError(ValueError):
    """A training flag that cannot be honoured; the message names it."""


class NonFiniteLossError(RuntimeError):
    """Raised after --max_skipped_steps consecutive micro-batches had a non-finite loss."""


def translate_legacy_flags(argv, cuda: Optional[bool] = None):
    """Rewrite LLaVA-1.5-era flags for transformers 5 and for a machine without CUDA, saying what changed.

    - renamed flags (RENAMED_FLAGS) are renamed;
    - without CUDA: `--tf32` (a CUDA matmul mode) is dropped, and `--use_cpu True` is added, which
      transformers needs for `--bf16` on CPU. The very same GPU launchers thus run on CPU stand-ins.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    out, notes, i = [], [], 0
    argv = list(argv)
    while i < len(argv):
        flag, value, joined = argv[i], None, False
        if flag.startswith("--") and "=" in flag:
            flag, value = flag.split("=", 1)
            joined = True
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
        step = 1 if joined or value is None else 2
        if flag == "--warmup_ratio" and value is not None:
            try:
                ok = 0 <= float(value) < 1
            except ValueError:
                ok = False
            if not ok:
                raise ArgumentError(f"--warmup_ratio {value}: expected a ratio in [0, 1)")
        if flag in RENAMED_FLAGS:
            notes.append(f"{flag} -> {RENAMED_FLAGS[flag]} (renamed in transformers 5)")
            flag = RENAMED_FLAGS[flag]
        if flag == "--tf32" and not cuda:
            notes.append(f"--tf32 {value} dropped (a CUDA matmul mode; no CUDA here)")
            i += step
            continue
        out += [flag] if value is None else [flag, value] if not joined else [f"{flag}={value}"]
        i += step
    if not cuda and not any(a == "--use_cpu" or a.startswith("--use_cpu=") for a in out):
        out += ["--use_cpu", "True"]
        notes.append("--use_cpu True added (no CUDA here)")
    return out, notes


def lora_target_modules(model) -> str:
    """A regex over the LLM's own Linear layers (all of them but lm_head, as LLaVA's find_all_linear_names).

    LLaVA passes bare leaf names (q_proj, ...), which peft also matches inside CLIP's encoder; here the
    regex names full module paths, so the vision tower and the projector are never targeted.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and n != "lm_head" and not any(k in n for k in MULTIMODAL_MODULES)]
    if not names:
        raise ValueError("no Linear layers found in the LLM for LoRA")
    # one pattern per layer kind: model.layers.7.self_attn.q_proj -> model\.layers\.\d+\.self_attn\.q_proj
    kinds = dict.fromkeys(re.sub(r"\.\d+\.", ".N.", n) for n in names)
    return "(?:" + "|".join(re.escape(k).replace(r"\.N\.", r"\.\d+\.") for k in kinds) + ")"


class LLaVATrainer(Trainer):
    """LLaVA's trainer (modality-grouped batches, projector lr) plus a non-finite loss guard.

    A micro-batch whose loss is NaN/inf on any rank is skipped on every rank: no backward, so no
    gradient reaches the optimizer and neither weights nor Adam moments move (with gradient
    accumulation the window's other micro-batches still step). Skips are counted with their
    sample ids; --max_skipped_steps in a row stop the run.
    """

    def __init__(self, *args, modality_lengths=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.modality_lengths = modality_lengths
        self.skipped_nonfinite = []  # {"step", "loss", "ids"} per skipped micro-batch
        self._consecutive_skips = 0
        self._skip_backward = False
        self._skips_since_log = 0
        self._last_log_step = 0

    def log(self, logs, *args, **kwargs):
        # HF's nan filter logs a skipped step as the window's running mean: 0 when the window is that
        # step alone. Say what happened instead.
        if "loss" in logs and self._skips_since_log:
            steps = max(1, self.state.global_step - self._last_log_step) * self.args.gradient_accumulation_steps
            logs["nonfinite_skipped"] = self._skips_since_log
            if self._skips_since_log >= steps:
                logs["loss"] = float("nan")
        if "loss" in logs:
            self._skips_since_log, self._last_log_step = 0, self.state.global_step
        return super().log(logs, *args, **kwargs)

    def _install_backward_guard(self):
        # the Trainer calls accelerator.backward right after compute_loss; DeepSpeed's engine.step
        # runs inside it, so skipping it skips the step on every engine
        accel = self.accelerator
        if getattr(accel.backward, "_llava_drip_guard", False):
            return
        real_backward = accel.backward

        def backward(loss, **kwargs):
            if self._skip_backward:
                self._skip_backward = False
                return None
            return real_backward(loss, **kwargs)

        backward._llava_drip_guard = True
        accel.backward = backward

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._install_backward_guard()
        self._skip_backward = False
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs.pop("sample_ids", None)
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch)
        if model.training:
            self._check_finite(out[0] if return_outputs else out, ids)
        return out

    def _check_finite(self, loss, ids):
        bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0], device=loss.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # every rank skips together
        if bad.item() == 0.0:
            self._consecutive_skips = 0
            return
        self._skip_backward = True
        self._consecutive_skips += 1
        self._skips_since_log += 1
        step = self.state.global_step + 1
        mine = (float(loss.detach().float().mean()), [str(i) for i in ids or []])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            every = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every, mine)
        else:
            every = [mine]
        losses = [l for l, _ in every]
        bad_ids = [i for l, r in every if not math.isfinite(l) for i in r]
        rec = {"step": step, "losses": losses, "ids": bad_ids}
        self.skipped_nonfinite.append(rec)
        shown = ", ".join(bad_ids[:8]) or "ids unknown"
        _logger.warning("step %d: non-finite loss %s (samples %s); micro-batch skipped on every rank, no weight "
                        "or optimizer update (%d in a row, limit %d)", step, losses, shown,
                        self._consecutive_skips, self.args.max_skipped_steps)
        if self._consecutive_skips >= self.args.max_skipped_steps:
            raise NonFiniteLossError(
                f"stopping at step {step}: {self._consecutive_skips} micro-batches in a row had a non-finite loss "
                f"(last: samples {shown}). No update was applied for them, so the weights are those of the last "
                f"finite step (and of the last checkpoint in {self.args.output_dir}). Check those images/records, "
                f"lower --learning_rate, or use bf16/fp32 instead of fp16; --max_skipped_steps raises the limit.")

    def _get_train_sampler(self, train_dataset=None):
        if self.modality_lengths is not None:
            return ModalityLengthGroupedSampler(
                self.modality_lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps,
                self.args.world_size, seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model=None):
        lrs = {"mm_projector": self.args.mm_projector_lr, "vision_tower": self.args.mm_vision_tower_lr}
        if all(v is None for v in lrs.values()) or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = {}
        for n, p in opt_model.named_parameters():
            if not p.requires_grad:
                continue
            part = next((k for k, v in lrs.items() if v is not None and k in n), None)
            key = (part, n in decay)
            groups.setdefault(key, {"params": [], "weight_decay": self.args.weight_decay if n in decay else 0.0,
                                    **({"lr": lrs[part]} if part else {})})["params"].append(p)
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = cls(list(groups.values()), **kwargs)
        return self.optimizer


def _gather(named_params):
    """Full CPU copies of parameters, gathering ZeRO-3 partitions when needed."""
    out = {}
    for name, p in named_params:
        if hasattr(p, "ds_id"):
            import deepspeed
            with deepspeed.zero.GatheredParameters([p]):
                out[name] = p.data.detach().cpu().clone()
        else:
            out[name] = p.detach().cpu().clone()
    return out


def save_stage1(model, output_dir: str, rank0: bool):
    proj = _gather((f"model.mm_projector.{n}", p) for n, p in model.get_model().mm_projector.named_parameters())
    if rank0:
        os.makedirs(output_dir, exist_ok=True)
        # LLaVA's file name and keys, plus a safetensors twin that our loader prefers
        atomic_save_tensors(proj, os.path.join(output_dir, "mm_projector.bin"), torch_format=True)
        atomic_save_tensors(proj, os.path.join(output_dir, "mm_projector.safetensors"))
        model.config.save_pretrained(output_dir)


# peft's LoraConfig fields up to peft 0.6 (LLaVA's era): newer fields at their default values are left out
# of adapter_config.json, since older peft rejects any field it does not know
_OLD_PEFT_FIELDS = {"peft_type", "task_type", "inference_mode", "base_model_name_or_path", "revision", "auto_mapping",
                    "r", "target_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "modules_to_save",
                    "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern"}


def _portable_adapter_config(path: str, lora_config):
    from peft import LoraConfig
    default = LoraConfig(task_type=lora_config.task_type).to_dict()
    cfg = json.load(open(path))
    # a newer field set away from its default is kept: older peft then fails loudly, as it should
    keep = {k: v for k, v in cfg.items() if k in _OLD_PEFT_FIELDS or json.dumps(v) != json.dumps(default.get(k))}
    for k in ("rank_pattern", "alpha_pattern"):  # 0.6 fields; absent before, so drop when empty
        if not keep.get(k):
            keep.pop(k, None)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(keep, f, indent=2)
    os.replace(tmp, path)


def save_lora(model, output_dir: str, rank0: bool):
    """LLaVA's LoRA folder: adapter_config.json + adapter weights, config.json, non_lora_trainables.bin.

    non_lora_trainables keys are LLaVA's (`base_model.model.model.mm_projector.*`, the PeftModel's names);
    a DRIP or open_clip tower travels there too, since no base checkpoint holds it. An HF CLIP tower
    is loaded from its source, as LLaVA does. A safetensors copy sits beside the .bin.
    """
    base = model.get_base_model()
    prefixes = ("model.mm_projector.",)
    if base.config.mm_vision_tower_type != "hf_clip":
        prefixes += ("model.vision_tower.",)
    extra = _gather((f"base_model.model.{n}", p) for n, p in base.named_parameters() if n.startswith(prefixes))
    persistent = set(base.state_dict(keep_vars=True))  # buffers too: the DRIP tower's calibration travels
    extra.update({f"base_model.model.{n}": b.detach().cpu().clone() for n, b in base.named_buffers()
                  if n.startswith(prefixes) and n in persistent})
    adapter = _gather((n, p) for n, p in model.named_parameters() if "lora_" in n)
    if rank0:
        os.makedirs(output_dir, exist_ok=True)
        base.config.save_pretrained(output_dir)
        model.save_pretrained(output_dir, state_dict=adapter)
        _portable_adapter_config(os.path.join(output_dir, "adapter_config.json"), model.peft_config["default"])
        atomic_save_tensors(extra, os.path.join(output_dir, "non_lora_trainables.bin"), torch_format=True)
        atomic_save_tensors(extra, os.path.join(output_dir, "non_lora_trainables.safetensors"))


def save_tokenizer(tokenizer, output_dir: str):
    """save_pretrained, plus the sentencepiece `tokenizer.model` LLaVA's slow-tokenizer loading needs."""
    tokenizer.save_pretrained(output_dir)
    src = getattr(tokenizer, "vocab_file", None)
    dst = os.path.join(output_dir, "tokenizer.model")
    if src and str(src).endswith(".model") and os.path.isfile(src) and not os.path.exists(dst):
        shutil.copyfile(src, dst + ".tmp")
        os.replace(dst + ".tmp", dst)


def _train_budgets(model_args, tower):
    """--drip_train_budgets as a list of budget specs (checked now, not at the first step)."""
    if not model_args.drip_train_budgets:
        return None
    from llava_drip.drip.budget import parse_budget
    specs = [s.strip() for s in model_args.drip_train_budgets.split(",") if s.strip()]
    try:
        budgets = [parse_budget(s) for s in specs]
    except ValueError as e:
        raise ArgumentError(f"--drip_train_budgets {model_args.drip_train_budgets}: {e}") from e
    if tower is None or not hasattr(tower.vision_tower, "calibrate"):
        raise ArgumentError("--drip_train_budgets needs a DRIP vision tower")
    if any(b.kind == "mean" for b in budgets) and not tower.vision_tower.is_calibrated:
        raise ArgumentError("--drip_train_budgets with mean:R budgets needs a calibrated tower (llava-drip calibrate)")
    return [str(b) for b in budgets]


def _template_name(version: str) -> str:
    """LLaVA's train.py keeps its default template (vicuna_v1) for --version v0 / v0.5."""
    if version in ("v0", "v0.5"):
        _logger.info("--version %s trains with the vicuna_v1 template, as LLaVA's train.py does", version)
        return "vicuna_v1"
    return version


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def build_model(model_args, training_args):
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    base_cfg = transformers.AutoConfig.from_pretrained(model_args.model_name_or_path)
    # the base LLM's family picks the LLaVA class: qwen2 -> llava_qwen, mistral -> llava_mistral, else llava_llama
    cfg_cls, model_cls = llava_classes(type(base_cfg).model_type)
    if any(isinstance(base_cfg, c) for c, _ in LLAVA_CLASSES.values()):
        cfg = base_cfg
    else:
        d = {k: v for k, v in base_cfg.to_dict().items() if k not in ("model_type", "transformers_version", "architectures")}
        cfg = cfg_cls(**d)
    extra = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    model = model_cls.from_pretrained(model_args.model_name_or_path, config=cfg, torch_dtype=dtype, **extra)
    model.config.use_cache = False
    if model_args.vision_tower:
        if model_args.mm_use_im_start_end or model_args.mm_use_im_patch_token:
            raise ValueError("mm_use_im_start_end / mm_use_im_patch_token are not supported (LLaVA-1.5 uses neither)")
        model.get_model().initialize_vision_modules(model_args)
        model.get_vision_tower().to(dtype=dtype)
    model.config.tune_mm_mlp_adapter = model_args.tune_mm_mlp_adapter
    model.config.freeze_mm_mlp_adapter = training_args.freeze_mm_mlp_adapter
    model.config.mm_projector_lr = training_args.mm_projector_lr
    model.config.mm_use_im_start_end = model_args.mm_use_im_start_end
    model.config.mm_use_im_patch_token = model_args.mm_use_im_patch_token
    model.config.tokenizer_model_max_length = training_args.model_max_length
    if model_args.freeze_backbone:
        model.get_model().requires_grad_(False)
    if model_args.tune_mm_mlp_adapter:
        model.requires_grad_(False)
        model.get_model().mm_projector.requires_grad_(True)
    if training_args.freeze_mm_mlp_adapter and model_args.vision_tower:
        model.get_model().mm_projector.requires_grad_(False)
    if model_args.vision_tower:
        model.get_vision_tower().requires_grad_(False)  # frozen unless --mm_tunable_parts names it
    parts = tunable_parts(model_args, training_args)
    if parts is not None:
        model.requires_grad_("mm_language_model" in parts)
        if model_args.vision_tower:
            model.get_model().mm_projector.requires_grad_("mm_mlp_adapter" in parts)
            tower = model.get_vision_tower()
            tower.requires_grad_("mm_vision_tower" in parts)
            predictor = getattr(tower.vision_tower, "boundary_predictor", None)
            if predictor is not None:  # LLaVA sees hard (eval-mode) boundaries: no gradient reaches it
                predictor.requires_grad_(False)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()
    if training_args.lora_enable:
        from peft import LoraConfig, get_peft_model
        lora = LoraConfig(r=training_args.lora_r, lora_alpha=training_args.lora_alpha,
                          target_modules=lora_target_modules(model),
                          lora_dropout=training_args.lora_dropout, bias=training_args.lora_bias, task_type="CAUSAL_LM")
        # adapters in the model dtype, as LLaVA had them: ZeRO-3 flattens all trainable tensors into one dtype
        model = get_peft_model(model, lora, autocast_adapter_dtype=False)
        if model_args.vision_tower and not training_args.freeze_mm_mlp_adapter:
            model.get_base_model().get_model().mm_projector.requires_grad_(True)
    return model


TUNABLE_PARTS = ("mm_vision_tower", "mm_mlp_adapter", "mm_language_model")


def tunable_parts(model_args, training_args):
    """The set --mm_tunable_parts names (None when not given), after checking it against the other flags."""
    raw = model_args.mm_tunable_parts
    if raw is None:
        return None
    parts = {p.strip() for p in raw.split(",") if p.strip()}
    bad = sorted(parts - set(TUNABLE_PARTS))
    if bad or not parts:
        raise ArgumentError(f"--mm_tunable_parts {raw!r}: unknown part(s) {bad}; choose from {list(TUNABLE_PARTS)}")
    if model_args.tune_mm_mlp_adapter or training_args.freeze_mm_mlp_adapter or model_args.freeze_backbone:
        raise ArgumentError("--mm_tunable_parts replaces --tune_mm_mlp_adapter / --freeze_mm_mlp_adapter / "
                            "--freeze_backbone: give one or the other")
    if training_args.lora_enable:
        raise ArgumentError("--mm_tunable_parts with --lora_enable is not supported: LoRA picks what trains")
    if parts - {"mm_language_model"} and not model_args.vision_tower:
        raise ArgumentError(f"--mm_tunable_parts {raw!r} names multimodal parts but there is no --vision_tower")
    return parts


def compute_modality_lengths(dataset, tower, batch_size: int = 64):
    """Text length plus each image's real visual-token count (DRIP varies per image)."""
    counts = {}
    params = [p for p in tower.parameters() if hasattr(p, "ds_id")]
    gather = contextlib.nullcontext()
    if params:  # ZeRO-3 partitioned the tower (an HF CLIP from_pretrained): whole weights for this pass
        import deepspeed
        gather = deepspeed.zero.GatheredParameters(params)
    with torch.no_grad(), gather:
        images = [r["image"] for r in dataset.records if "image" in r]
        for k in range(0, len(images), batch_size):
            names = images[k:k + batch_size]
            pix = torch.stack([dataset.load_image({"image": n}) for n in names])
            for n, t in zip(names, tower(pix.to(tower.dtype))):
                counts[n] = int(t.shape[0])
    text = dataset.text_lengths()
    return [t + counts[r["image"]] if "image" in r else -t for r, t in zip(dataset.records, text)], counts


def parse_args(argv=None):
    """LLaVA's three argument dataclasses, after translate_legacy_flags; bad flags raise ArgumentError."""
    argv, notes = translate_legacy_flags(sys.argv[1:] if argv is None else argv)
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # unknown flags, or a value TrainingArguments refuses
        raise ArgumentError(str(e)) from e
    if training_args.bits in (4, 8):
        raise ArgumentError(f"--bits {training_args.bits}: 4/8-bit (QLoRA) training needs bitsandbytes on CUDA, "
                            "which this project does not support yet; use --bits 16 (with --lora_enable for LoRA)")
    if training_args.bits not in (16, 32):
        raise ArgumentError(f"--bits {training_args.bits}: expected 16 (or 4/8, not supported)")
    if model_args.drip_budget is not None:
        from llava_drip.drip.budget import parse_budget
        try:
            model_args.drip_budget = str(parse_budget(model_args.drip_budget))
        except ValueError as e:
            raise ArgumentError(f"--drip_budget: {e}") from e
    if model_args.mm_vision_token_pos in ("none", ""):
        model_args.mm_vision_token_pos = None
    if model_args.mm_vision_token_pos not in (None, "centroid"):
        raise ArgumentError(f"--mm_vision_token_pos {model_args.mm_vision_token_pos!r}: expected centroid or none")
    if data_args.image_grid_pinpoints is not None or data_args.image_aspect_ratio == "anyres":
        raise ArgumentError("--image_grid_pinpoints / --image_aspect_ratio anyres (LLaVA-NeXT) are not supported")
    return model_args, data_args, training_args, notes


def resume_checkpoint(training_args) -> Optional[str]:
    """The checkpoint to resume from: --resume_from_checkpoint as given (checked), or the newest complete one
    in output_dir (LLaVA's rerun-to-resume). Incomplete ones (a kill mid-save) are skipped and named; one
    holding pickled objects is refused, since DeepSpeed loads its engine files with weights_only=False."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    given = training_args.resume_from_checkpoint
    if given not in (None, "", "True", "true", "latest"):
        why = llava_checkpoint_problem(given, world)
        if why:
            raise ArgumentError(f"--resume_from_checkpoint {given}: {why}")
        return given
    found, skipped = pick_llava_checkpoint(training_args.output_dir, world)
    if _rank0():
        for path, why in skipped:
            _logger.warning("resume: skipping %s: %s", path, why)
        if found:
            _logger.info("resume: continuing from %s", found)
    if found is None and given not in (None, ""):
        raise ArgumentError(f"--resume_from_checkpoint {given}: no complete checkpoint-N in {training_args.output_dir}")
    return found


@contextlib.contextmanager
def _atomic_torch_save():
    real = torch.save
    torch.save = atomic_torch_save
    try:
        yield
    finally:
        torch.save = real


def _check_tower_name(model_args):
    if not model_args.vision_tower:
        return
    from llava_drip.drip.factory import list_models
    from llava_drip.model.multimodal_encoder.builder import resolve_tower_type
    try:
        resolve_tower_type(model_args.vision_tower, model_args.vision_tower_type)
    except ValueError as e:
        raise ArgumentError(f"--vision_tower: unknown model {model_args.vision_tower!r}. Available: {list_models()} "
                            f"(or any open_clip model, an HF CLIP folder or hub id) [{e}]") from None


def train(argv=None, attn_implementation: Optional[str] = None):
    model_args, data_args, training_args, notes = parse_args(argv)
    _check_tower_name(model_args)
    tunable_parts(model_args, training_args)  # a bad --mm_tunable_parts fails before any model is built
    if model_args.attn_implementation is None:
        model_args.attn_implementation = attn_implementation
    logging.basicConfig(level=logging.INFO if _rank0() else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for note in notes:
        _logger.info("flag translated: %s", note)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_args.model_name_or_path,
                                                           model_max_length=training_args.model_max_length)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    if training_args.deepspeed:
        # ZeRO-3 partitions weights while from_pretrained builds them; DeepSpeed's comm layer must
        # already know the world size (accelerate alone leaves it unset on CPU / gloo)
        import deepspeed
        _ = training_args.device
        deepspeed.init_distributed(dist_backend="gloo" if training_args.use_cpu else "nccl")
    # the projector (and a LoRA adapter) are initialised here, before the Trainer seeds: seed now so a run
    # depends on --seed alone, not on what the process did before
    transformers.set_seed(training_args.seed)
    model = build_model(model_args, training_args)
    core = model.get_base_model() if training_args.lora_enable else model
    tower = core.get_vision_tower() if model_args.vision_tower else None
    if tower is not None:
        core.config.image_aspect_ratio = data_args.image_aspect_ratio
    conv = get_conv_template(_template_name(model_args.version))
    train_budgets = _train_budgets(model_args, tower)
    bad_dir = os.path.join(training_args.output_dir, "bad_samples")
    bad_log = BadSampleLog(bad_dir, strict=data_args.strict)
    dataset = LazySupervisedDataset(
        data_args.data_path, tokenizer, conv, data_args.image_folder,
        image_processor=tower.image_processor if tower is not None else None,
        image_aspect_ratio=data_args.image_aspect_ratio, model_max_length=training_args.model_max_length,
        bad_log=bad_log, train_budgets=train_budgets, seed=training_args.seed)
    image_shape = None
    if tower is not None:
        crop = tower.image_processor.crop_size
        image_shape = (3, crop["height"], crop["width"])
    lengths = None
    if training_args.group_by_modality_length:
        if tower is None:
            raise ValueError("--group_by_modality_length needs a vision tower")
        lengths, counts = compute_modality_lengths(dataset, tower)
        if _rank0() and counts:
            _logger.info("visual tokens per image: mean %.1f, min %d, max %d", sum(counts.values()) / len(counts),
                         min(counts.values()), max(counts.values()))
    trainer = LLaVATrainer(model=model, args=training_args, train_dataset=dataset,
                           data_collator=DataCollatorForSupervisedDataset(tokenizer, image_shape),
                           processing_class=tokenizer, modality_lengths=lengths)
    resume = resume_checkpoint(training_args)
    with _atomic_torch_save():  # optimizer/scheduler/rng and DeepSpeed's engine files
        trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()
    core.config.use_cache = True
    rank0 = trainer.is_world_process_zero()
    if model_args.tune_mm_mlp_adapter:
        save_stage1(core, training_args.output_dir, rank0)
    elif training_args.lora_enable:
        save_lora(model, training_args.output_dir, rank0)
    else:
        trainer.save_model(training_args.output_dir)
    if rank0:
        save_tokenizer(tokenizer, training_args.output_dir)
        record = {"model_name_or_path": model_args.model_name_or_path, "model_args": asdict(model_args),
                  "data_path": data_args.data_path}
        with open(os.path.join(training_args.output_dir, "llava_drip_train.json"), "w") as f:
            json.dump(record, f, indent=1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    bad = BadSampleLog.collect(bad_dir)
    truncated = BadSampleLog.collect(bad_dir, prefix="truncated-")
    if rank0:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and math.isfinite(h["loss"])]
        summary = {"skipped": len(bad), "skipped_ids": sorted(bad), "reasons": bad, "losses": losses,
                   "train_samples": len(dataset), "truncated": len(truncated), "truncated_ids": sorted(truncated),
                   "nonfinite_skipped": len(trainer.skipped_nonfinite),
                   "nonfinite_steps": trainer.skipped_nonfinite}
        with open(os.path.join(training_args.output_dir, "train_summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if bad:
            print(f"skipped {len(bad)} bad samples (ids and reasons in {bad_dir}):", file=sys.stderr)
            for sid, reason in sorted(bad.items())[:20]:
                print(f"  {sid}: {reason}", file=sys.stderr)
        else:
            print("skipped 0 bad samples")
        if truncated:
            print(f"cut {len(truncated)} samples to --model_max_length {training_args.model_max_length} "
                  f"(ids and lengths in {bad_dir}/truncated-*.jsonl): " + ", ".join(sorted(truncated)[:20]),
                  file=sys.stderr)
        nf = trainer.skipped_nonfinite
        if nf:
            print(f"skipped {len(nf)} micro-batches with a non-finite loss (no update applied):", file=sys.stderr)
            for r in nf[:20]:
                print(f"  step {r['step']}: samples {', '.join(r['ids']) or '?'}", file=sys.stderr)
        else:
            print("skipped 0 non-finite steps")
    return trainer


def main(argv=None, attn_implementation: Optional[str] = None):
    try:
        train(argv, attn_implementation)
    except ArgumentError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except UnsafeCheckpointError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except NonFiniteLossError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)  # every rank stops together; skip gloo/NCCL teardown, which can hang after an abort
    # multi-rank CPU runs can abort in gloo teardown at interpreter exit after finishing: end cleanly
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

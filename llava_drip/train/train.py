"""LLaVA stage 1 (projector) and stage 2 (instruction tuning, full or LoRA) with HF Trainer + DeepSpeed.

Launch as LLaVA users do:
    deepspeed llava_drip/train/train.py --deepspeed scripts/zero2.json --model_name_or_path ... \
        --version plain --data_path ... --image_folder ... --vision_tower DRIP-4x-32 \
        --vision_tower_pretrained runs/clip/epoch_latest.pt --tune_mm_mlp_adapter True ...
"""
import json
import logging
import os
import pathlib
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional

if __package__ in (None, ""):  # `deepspeed llava_drip/train/train.py` runs this file as a script
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import torch
import transformers
from transformers import Trainer

from llava_drip.conversation import get_conv_template
from llava_drip.model import LlavaConfig, LlavaLlamaForCausalLM
from llava_drip.utils import atomic_save_tensors
from llava_drip.train.data import (BadSampleLog, DataCollatorForSupervisedDataset, LazySupervisedDataset,
                                   ModalityLengthGroupedSampler)

_logger = logging.getLogger("llava_drip.train")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "base LLM folder (HF format) or a LLaVA checkpoint"})
    version: str = field(default="v1", metadata={"help": "conversation template: plain | v1 (vicuna_v1)"})
    freeze_backbone: bool = False
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "stage 1: train only the projector"})
    vision_tower: Optional[str] = field(default=None, metadata={"help": "DRIP-4x-32, ViT-B-32, or an HF CLIP folder"})
    vision_tower_type: str = field(default="auto", metadata={"help": "drip | open_clip | hf_clip | auto"})
    vision_tower_pretrained: Optional[str] = field(default=None, metadata={"help": "clip-train checkpoint for the tower"})
    mm_vision_select_layer: int = -1
    mm_vision_select_feature: str = "patch"
    drip_eval_mode: str = field(default="threshold", metadata={"help": "DRIP boundaries for LLaVA: threshold | topk | sample"})
    pretrain_mm_mlp_adapter: Optional[str] = field(default=None, metadata={"help": "stage-1 mm_projector.bin"})
    mm_projector_type: str = "linear"
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False


@dataclass
class DataArguments:
    data_path: str = field(default=None, metadata={"help": "LLaVA JSON data"})
    lazy_preprocess: bool = True
    is_multimodal: bool = False
    image_folder: Optional[str] = None
    image_aspect_ratio: str = "square"
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
    freeze_mm_mlp_adapter: bool = False
    remove_unused_columns: bool = False
    bits: int = 16


LORA_TARGETS = r".*\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"  # the LLM only


class LLaVATrainer(Trainer):
    def __init__(self, *args, modality_lengths=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.modality_lengths = modality_lengths

    def _get_train_sampler(self, train_dataset=None):
        if self.modality_lengths is not None:
            return ModalityLengthGroupedSampler(
                self.modality_lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps,
                self.args.world_size, seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model=None):
        if self.args.mm_projector_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = {}
        for n, p in opt_model.named_parameters():
            if not p.requires_grad:
                continue
            is_proj = "mm_projector" in n
            key = (is_proj, n in decay)
            groups.setdefault(key, {"params": [], "weight_decay": self.args.weight_decay if n in decay else 0.0,
                                    **({"lr": self.args.mm_projector_lr} if is_proj else {})})["params"].append(p)
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


def save_lora(model, output_dir: str, rank0: bool):
    base = model.get_base_model()
    extra = _gather((n, p) for n, p in base.named_parameters()
                    if n.startswith(("model.mm_projector.", "model.vision_tower.")))
    adapter = _gather((n, p) for n, p in model.named_parameters() if "lora_" in n)
    if rank0:
        os.makedirs(output_dir, exist_ok=True)
        base.config.save_pretrained(output_dir)
        model.save_pretrained(output_dir, state_dict=adapter)
        atomic_save_tensors(extra, os.path.join(output_dir, "non_lora_trainables.safetensors"))


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def build_model(model_args, training_args):
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    base_cfg = transformers.AutoConfig.from_pretrained(model_args.model_name_or_path)
    if isinstance(base_cfg, LlavaConfig):
        cfg = base_cfg
    else:
        d = {k: v for k, v in base_cfg.to_dict().items() if k not in ("model_type", "transformers_version", "architectures")}
        cfg = LlavaConfig(**d)
    model = LlavaLlamaForCausalLM.from_pretrained(model_args.model_name_or_path, config=cfg, torch_dtype=dtype)
    model.config.use_cache = False
    if model_args.vision_tower:
        if model_args.mm_use_im_start_end or model_args.mm_use_im_patch_token:
            raise ValueError("mm_use_im_start_end / mm_use_im_patch_token are not supported (LLaVA-1.5 uses neither)")
        model.get_model().initialize_vision_modules(model_args)
        model.get_vision_tower().to(dtype=dtype)
    model.config.tune_mm_mlp_adapter = model_args.tune_mm_mlp_adapter
    model.config.tokenizer_model_max_length = training_args.model_max_length
    if model_args.freeze_backbone:
        model.get_model().requires_grad_(False)
    if model_args.tune_mm_mlp_adapter:
        model.requires_grad_(False)
        model.get_model().mm_projector.requires_grad_(True)
    if training_args.freeze_mm_mlp_adapter and model_args.vision_tower:
        model.get_model().mm_projector.requires_grad_(False)
    if model_args.vision_tower:
        model.get_vision_tower().requires_grad_(False)  # frozen in every stage
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()
    if training_args.lora_enable:
        from peft import LoraConfig, get_peft_model
        lora = LoraConfig(r=training_args.lora_r, lora_alpha=training_args.lora_alpha, target_modules=LORA_TARGETS,
                          lora_dropout=training_args.lora_dropout, bias=training_args.lora_bias, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        if model_args.vision_tower and not training_args.freeze_mm_mlp_adapter:
            model.get_base_model().get_model().mm_projector.requires_grad_(True)
    return model


def compute_modality_lengths(dataset, tower, batch_size: int = 64):
    """Text length plus each image's real visual-token count (DRIP varies per image)."""
    counts = {}
    with torch.no_grad():
        images = [r["image"] for r in dataset.records if "image" in r]
        for k in range(0, len(images), batch_size):
            names = images[k:k + batch_size]
            pix = torch.stack([dataset.load_image({"image": n}) for n in names])
            for n, t in zip(names, tower(pix.to(tower.dtype))):
                counts[n] = int(t.shape[0])
    text = dataset.text_lengths()
    return [t + counts[r["image"]] if "image" in r else -t for r, t in zip(dataset.records, text)], counts


def train(argv=None):
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO if _rank0() else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    model = build_model(model_args, training_args)
    core = model.get_base_model() if training_args.lora_enable else model
    tower = core.get_vision_tower() if model_args.vision_tower else None
    if tower is not None:
        core.config.image_aspect_ratio = data_args.image_aspect_ratio
    conv = get_conv_template(model_args.version)
    bad_dir = os.path.join(training_args.output_dir, "bad_samples")
    bad_log = BadSampleLog(bad_dir, strict=data_args.strict)
    dataset = LazySupervisedDataset(
        data_args.data_path, tokenizer, conv, data_args.image_folder,
        image_processor=tower.image_processor if tower is not None else None,
        image_aspect_ratio=data_args.image_aspect_ratio, model_max_length=training_args.model_max_length,
        max_image_tokens=tower.num_patches if tower is not None else 0, bad_log=bad_log)
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
    resume = training_args.resume_from_checkpoint
    if resume is None and list(pathlib.Path(training_args.output_dir).glob("checkpoint-*")):
        resume = True
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
        tokenizer.save_pretrained(training_args.output_dir)
        record = {"model_name_or_path": model_args.model_name_or_path, "model_args": asdict(model_args),
                  "data_path": data_args.data_path}
        with open(os.path.join(training_args.output_dir, "llava_drip_train.json"), "w") as f:
            json.dump(record, f, indent=1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    bad = BadSampleLog.collect(bad_dir)
    if rank0:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        summary = {"skipped": len(bad), "skipped_ids": sorted(bad), "reasons": bad, "losses": losses,
                   "train_samples": len(dataset)}
        with open(os.path.join(training_args.output_dir, "train_summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if bad:
            print(f"skipped {len(bad)} bad samples (ids and reasons in {bad_dir}):", file=sys.stderr)
            for sid, reason in sorted(bad.items())[:20]:
                print(f"  {sid}: {reason}", file=sys.stderr)
        else:
            print("skipped 0 bad samples")
    return trainer


def main(argv=None):
    train(argv)
    # multi-rank CPU runs can abort in gloo teardown at interpreter exit after finishing: end cleanly
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

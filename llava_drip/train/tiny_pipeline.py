"""Build a small but trained LLaVA-DRIP on CPU, in one process: the built-in model of the demo and tests.

synthetic shapes data -> tiny Llama (+ short text pretraining) -> DRIP tower (given, or pretrained here
with `llava-drip clip-train` on synthetic image-caption pairs, or seeded random with clip_epochs=0)
-> calibrated boundaries (held-out images; clip-train does it for a tower it trains)
-> stage 1 (projector, `plain`) -> stage 2 (full, `vicuna_v1`).
Every step is the real code path (HF Trainer, the same train.py), only sized down; DeepSpeed is left
out here so the demo starts without compiling ops (tests cover the DeepSpeed launcher separately).

`python -m llava_drip.train.tiny_pipeline --out DIR` ; the finished model is DIR/stage2.
"""
import argparse
import json
import os
import shutil
from typing import Optional

DEFAULT_CACHE = os.path.join(os.path.expanduser(os.environ.get("LLAVA_DRIP_HOME", "~/.cache/llava_drip")), "tiny-llava")


def _train_args(out, **kw):
    base = ["--output_dir", out, "--report_to", "none", "--use_cpu", "True", "--save_strategy", "no",
            "--dataloader_num_workers", "0", "--logging_steps", "5", "--disable_tqdm", "True", "--seed", "0"]
    for k, v in kw.items():
        base += [f"--{k}", str(v)]
    return base


def save_random_tower(model_name: str, path: str, seed: int = 0):
    import torch
    from safetensors.torch import save_file
    from llava_drip.drip import create_model
    torch.manual_seed(seed)
    model = create_model(model_name)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def pretrain_tower(out: str, tower: str, seed: int = 0, n: int = 2000, epochs: int = 3) -> str:
    """Contrastive pretraining of the tower with `llava-drip clip-train` (open_clip_train's loop) on
    synthetic shape captions; returns the exported model.safetensors."""
    from llava_drip.clip.checkpoint import export_weights
    from llava_drip.clip.train import main as clip_train
    from llava_drip.data import synth_clip

    weights = os.path.join(out, f"{tower}-clip.safetensors")
    if os.path.isfile(weights):
        return weights
    data = os.path.join(out, "clip_data")
    if not os.path.isfile(os.path.join(data, "train.csv")):
        synth_clip.main(["--out", data, "--n", str(n), "--seed", str(seed), "--val-per-class", "5", "--quiet"])
    logs = os.path.join(out, "clip_runs")
    rc = clip_train(["--model", tower, "--train-data", os.path.join(data, "train.csv"), "--dataset-type", "csv",
                     "--batch-size", "64", "--epochs", str(epochs), "--lr", "1e-3", "--warmup", "20", "--wd", "0.1",
                     "--precision", "fp32", "--device", "cpu", "--workers", "0", "--seed", str(seed),
                     "--logs", logs, "--name", tower, "--log-every-n-steps", "10", "--save-most-recent",
                     "--drip-calibration-data", os.path.join(data, "val")])
    ckpt = os.path.join(logs, tower, "checkpoints", f"epoch_{epochs}.pt")
    if rc != 0 or not os.path.isfile(ckpt):
        raise RuntimeError(f"tower pretraining failed (rc {rc}); log: {os.path.join(logs, tower, 'out.log')}")
    return str(export_weights(ckpt, weights, tower))


def _calibrated(tower: str, checkpoint: str, held_out: str) -> str:
    """The checkpoint, calibrated on held-out images first if it is not (a random or older tower)."""
    from llava_drip.drip import create_model
    from llava_drip.model.multimodal_encoder.towers import _visual_state_dict
    model = create_model(tower)
    model.visual.load_state_dict(_visual_state_dict(checkpoint), strict=True)  # a tower-only file works too
    if model.visual.is_calibrated or not os.path.isdir(held_out):
        return checkpoint
    from llava_drip.clip.calibrate import calibrate_checkpoint
    calibrate_checkpoint(tower, checkpoint, [held_out])
    return checkpoint


def build(out: str, n: int = 1500, seed: int = 0, tower: str = "DRIP-4x-tiny", tower_checkpoint: Optional[str] = None,
          lm_steps: int = 150, stage1_epochs: int = 1, stage2_epochs: int = 3, lora: bool = False,
          clip_epochs: int = 3, drip_eval_mode: str = "calibrated", drip_train_budgets: Optional[str] = None,
          drip_budget: Optional[str] = None, force: bool = False, stage2_extra: Optional[dict] = None,
          token_pos: Optional[str] = None, position_qa: float = 0.0) -> str:
    """Run the whole tiny pipeline into `out` (skipping finished steps) and return the stage-2 folder.

    drip_eval_mode defaults to 'calibrated': the cut on the predictor's logits that keeps p N tokens
    on average over held-out images, each image its own count (after a short pretraining the
    predictor's probabilities sit near p for every patch, and 'threshold' would keep one or two).
    drip_train_budgets: stage 2 draws one of these budgets per sample (see train.py).
    stage2_extra: more train.py flags for stage 2 (e.g. mm_tunable_parts, mm_vision_tower_lr).
    token_pos: --mm_vision_token_pos for both stages ('centroid': tokens carry where they lie).
    position_qa: synth llava's --position-qa (the chance a QA record gets one more position question).
    """
    from llava_drip.data import synth_llava
    from llava_drip.train import tiny
    from llava_drip.train.train import train

    final = os.path.join(out, "stage2-lora" if lora else "stage2")
    if force and os.path.isdir(out):
        shutil.rmtree(out)
    if os.path.isfile(os.path.join(final, "llava_drip_train.json")):
        return final
    os.makedirs(out, exist_ok=True)
    data = os.path.join(out, "data")
    if not os.path.isfile(os.path.join(data, "finetune.json")):
        synth_llava.main(["--out", data, "--n", str(n), "--seed", str(seed), "--quiet",
                          *(["--position-qa", str(position_qa)] if position_qa else [])])
    llm = os.path.join(out, "llm")
    if not os.path.isfile(os.path.join(llm, "config.json")):
        lines = tiny.corpus_from_llava_json([os.path.join(data, "pretrain.json"), os.path.join(data, "finetune.json")])
        tiny.build_tiny_llm(llm, lines, seed=seed, lm_steps=lm_steps)
    if tower_checkpoint is None and clip_epochs > 0:
        tower_checkpoint = pretrain_tower(out, tower, seed, epochs=clip_epochs)
    elif tower_checkpoint is None:
        tower_checkpoint = os.path.join(out, f"{tower}-seed{seed}.safetensors")
        if not os.path.isfile(tower_checkpoint):
            save_random_tower(tower, tower_checkpoint, seed)
    if drip_eval_mode == "calibrated":
        tower_checkpoint = _calibrated(tower, tower_checkpoint, os.path.join(data, "sqa", "images"))  # held out
    common = dict(model_name_or_path=llm, image_folder=data, vision_tower=tower,
                  vision_tower_pretrained=tower_checkpoint, mm_projector_type="mlp2x_gelu",
                  drip_eval_mode=drip_eval_mode,
                  per_device_train_batch_size=16, model_max_length=384)
    if token_pos:
        common["mm_vision_token_pos"] = token_pos
    s1 = os.path.join(out, "stage1")
    if not os.path.isfile(os.path.join(s1, "mm_projector.bin")):
        train(_train_args(s1, version="plain", data_path=os.path.join(data, "pretrain.json"),
                          tune_mm_mlp_adapter=True, learning_rate=2e-3, num_train_epochs=stage1_epochs, **common))
    extra = dict(lora_enable=True, lora_r=16, lora_alpha=32, learning_rate=2e-3) if lora else dict(learning_rate=1e-3)
    if drip_train_budgets:
        extra["drip_train_budgets"] = drip_train_budgets
    if drip_budget:  # stage 2 only: stage 1 trains the projector on the tower's default
        extra["drip_budget"] = drip_budget
    extra.update(stage2_extra or {})
    train(_train_args(final, version="v1", data_path=os.path.join(data, "finetune.json"),
                      pretrain_mm_mlp_adapter=os.path.join(s1, "mm_projector.bin"), image_aspect_ratio="pad",
                      group_by_modality_length=True, num_train_epochs=stage2_epochs, **extra, **common))
    return final


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_drip.train.tiny_pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_CACHE)
    p.add_argument("--n", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tower", default="DRIP-4x-tiny")
    p.add_argument("--tower-checkpoint", default=None,
                   help="clip-train checkpoint or exported weights (default: pretrain the tower here)")
    p.add_argument("--clip-epochs", type=int, default=3,
                   help="epochs of contrastive tower pretraining when no checkpoint is given (0: seeded random tower)")
    p.add_argument("--drip-eval-mode", default="calibrated", choices=["calibrated", "threshold", "topk", "sample"])
    p.add_argument("--drip-train-budgets", default=None, help="stage 2 draws one per sample, e.g. 1.0,0.5,0.25,0.1")
    p.add_argument("--drip-budget", default=None, help="the model's default tokens per image (0.25, 16, mean:0.25)")
    p.add_argument("--lora", action="store_true")
    p.add_argument("--force", action="store_true", help="rebuild from scratch")
    args = p.parse_args(argv)
    final = build(args.out, args.n, args.seed, args.tower, args.tower_checkpoint, lora=args.lora,
                  clip_epochs=args.clip_epochs, drip_eval_mode=args.drip_eval_mode,
                  drip_train_budgets=args.drip_train_budgets, drip_budget=args.drip_budget, force=args.force)
    summary = json.load(open(os.path.join(final, "train_summary.json")))
    print(f"tiny LLaVA ready at {final} (stage-2 loss {summary['losses'][0]:.3f} -> {summary['losses'][-1]:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

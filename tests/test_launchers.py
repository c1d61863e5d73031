"""Every GPU launcher under scripts/ runs on CPU with its very flags, tiny stand-ins swapped in through the
variables scripts/common.sh documents; and LLaVA-1.5's own training scripts run with only the module path
changed. Each run takes two optimizer steps and leaves a checkpoint that loads."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_drip.data import synth_llava
from llava_drip.model.builder import load_pretrained_model
from llava_drip.train import tiny
from llava_drip.train.tiny_pipeline import save_random_tower
from llava_drip.train.train import ArgumentError, parse_args, translate_legacy_flags

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ, DS_ACCELERATOR="cpu", PATH=f"{VENV_BIN}:{os.environ['PATH']}", PYTHONPATH=str(REPO))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(cmd, env, cwd, log: Path):
    proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)
    log.write_text(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc.stdout


def _two_steps(out: Path):
    summary = json.load(open(out / "train_summary.json"))
    state = json.load(open(out / "trainer_state.json"))
    assert state["global_step"] == 2 and len(summary["losses"]) == 2, (state["global_step"], summary["losses"])
    assert all(l == l and l > 0 for l in summary["losses"]), summary["losses"]


@torch.no_grad()
def _answers(folder, model_base=None):
    """The checkpoint loads and runs a forward pass with an image."""
    tok, model, proc, _ = load_pretrained_model(str(folder), model_base=model_base and str(model_base))
    from PIL import Image
    from llava_drip.mm_utils import process_images, tokenizer_image_token
    ids = tokenizer_image_token("<image>\nWhat is shown?", tok, return_tensors="pt")[None]
    images = process_images([Image.new("RGB", (40, 30), (200, 30, 30))], proc, model.config)
    logits = model(input_ids=ids, images=images).logits
    assert torch.isfinite(logits).all()
    return model


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    d = tmp_path_factory.mktemp("launch")
    synth_llava.main(["--out", str(d / "data"), "--n", "64", "--seed", "2", "--quiet"])
    lines = tiny.corpus_from_llava_json([str(d / "data" / "pretrain.json"), str(d / "data" / "finetune.json")])
    tiny.build_tiny_llm(str(d / "llm"), lines, lm_steps=0)
    save_random_tower("DRIP-4x-tiny", str(d / "tower.safetensors"))
    tiny.build_tiny_hf_clip(str(d / "clip"))
    # batch sizes are the scripts' own (32 in stage 1, 16 in stage 2): 64 / 32 records give two steps per epoch
    ft = json.load(open(d / "data" / "finetune.json"))
    (d / "data" / "finetune32.json").write_text(json.dumps([r for r in ft if "image" in r][:32]))
    return d


@pytest.mark.slow
def test_project_launchers_on_cpu(stand_ins, tmp_path):
    d = stand_ins
    common = dict(LLM=d / "llm", VISION_TOWER="DRIP-4x-tiny", DRIP_CKPT=d / "tower.safetensors",
                  IMAGE_FOLDER=d / "data", NUM_GPUS=1, MAX_STEPS=2, REPORT_TO="none")
    s1 = tmp_path / "stage1"
    _run([str(REPO / "scripts" / "pretrain.sh")], _env(**common, DATA_PATH=d / "data" / "pretrain.json", OUT=s1,
                                                        MASTER_PORT=_free_port()), tmp_path, tmp_path / "s1.log")
    _two_steps(s1)
    _answers(s1, model_base=d / "llm")
    for script, out in (("finetune.sh", tmp_path / "stage2"), ("finetune_lora.sh", tmp_path / "stage2-lora")):
        log = _run([str(REPO / "scripts" / script)],
                   _env(**common, DATA_PATH=d / "data" / "finetune.json", PROJECTOR=s1 / "mm_projector.bin",
                        OUT=out, MASTER_PORT=_free_port()), tmp_path, tmp_path / f"{script}.log")
        assert "flag translated: --warmup_ratio -> --warmup_steps" in log
        _two_steps(out)
        model = _answers(out, model_base=d / "llm")
        assert model.config.mm_vision_tower == "DRIP-4x-tiny" and model.config.mm_vision_tower_type == "drip"


# LLaVA-1.5's scripts/v1_5/{pretrain,finetune,finetune_lora}.sh (haotian-liu/LLaVA), with `llava/` replaced by
# `llava_drip/` and `--report_to wandb` by `none` (wandb is not installed here); nothing else changed.
LLAVA15_COMMON = """\
    --mm_vision_select_layer -2 \\
    --mm_use_im_start_end False \\
    --mm_use_im_patch_token False \\
"""
LLAVA15_TAIL = """\
    --evaluation_strategy "no" \\
    --save_strategy "steps" \\
    --save_steps {save_steps} \\
    --save_total_limit 1 \\
    --learning_rate {lr} \\
    --weight_decay 0. \\
    --warmup_ratio 0.03 \\
    --lr_scheduler_type "cosine" \\
    --logging_steps 1 \\
    --tf32 True \\
    --model_max_length 2048 \\
    --gradient_checkpointing True \\
    --dataloader_num_workers 4 \\
    --lazy_preprocess True \\
    --report_to none
"""
LLAVA15_PRETRAIN = """#!/bin/bash

deepspeed llava_drip/train/train_mem.py \\
    --deepspeed ./scripts/zero2.json \\
    --model_name_or_path lmsys/vicuna-13b-v1.5 \\
    --version plain \\
    --data_path ./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json \\
    --image_folder ./playground/data/LLaVA-Pretrain/images \\
    --vision_tower openai/clip-vit-large-patch14-336 \\
    --mm_projector_type mlp2x_gelu \\
    --tune_mm_mlp_adapter True \\
""" + LLAVA15_COMMON + """\
    --bf16 True \\
    --output_dir ./checkpoints/llava-v1.5-13b-pretrain \\
    --num_train_epochs 1 \\
    --per_device_train_batch_size 32 \\
    --per_device_eval_batch_size 4 \\
    --gradient_accumulation_steps 1 \\
""" + LLAVA15_TAIL.format(save_steps=24000, lr="1e-3")
LLAVA15_FINETUNE = """#!/bin/bash

deepspeed llava_drip/train/train_mem.py \\
{lora}    --deepspeed ./scripts/zero3.json \\
    --model_name_or_path lmsys/vicuna-13b-v1.5 \\
    --version v1 \\
    --data_path ./playground/data/llava_v1_5_mix665k.json \\
    --image_folder ./playground/data \\
    --vision_tower openai/clip-vit-large-patch14-336 \\
    --pretrain_mm_mlp_adapter ./checkpoints/llava-v1.5-13b-pretrain/mm_projector.bin \\
    --mm_projector_type mlp2x_gelu \\
""" + LLAVA15_COMMON + """\
    --image_aspect_ratio pad \\
    --group_by_modality_length True \\
    --bf16 True \\
    --output_dir ./checkpoints/{out} \\
    --num_train_epochs 1 \\
    --per_device_train_batch_size 16 \\
    --per_device_eval_batch_size 4 \\
    --gradient_accumulation_steps 1 \\
"""


@pytest.mark.slow
def test_llava15_training_scripts_run_unchanged(stand_ins, tmp_path, monkeypatch):
    """LLaVA's playground layout in a scratch folder; hub ids resolve to local folders of the same name."""
    d, root = stand_ins, tmp_path / "LLaVA"
    root.mkdir()
    for name in ("llava_drip", "scripts"):
        (root / name).symlink_to(REPO / name)
    (root / "lmsys").mkdir()
    (root / "lmsys" / "vicuna-13b-v1.5").symlink_to(d / "llm")
    (root / "openai").mkdir()
    (root / "openai" / "clip-vit-large-patch14-336").symlink_to(d / "clip")
    data = root / "playground" / "data"
    (data / "LLaVA-Pretrain").mkdir(parents=True)
    shutil.copy(d / "data" / "pretrain.json", data / "LLaVA-Pretrain" / "blip_laion_cc_sbu_558k.json")
    (data / "LLaVA-Pretrain" / "images").mkdir()
    (data / "LLaVA-Pretrain" / "images" / "images").symlink_to(d / "data" / "images")  # records: images/NNN.png
    (data / "images").symlink_to(d / "data" / "images")
    shutil.copy(d / "data" / "finetune32.json", data / "llava_v1_5_mix665k.json")
    scripts = {"pretrain.sh": LLAVA15_PRETRAIN,
               "finetune.sh": LLAVA15_FINETUNE.format(lora="", out="llava-v1.5-13b") + LLAVA15_TAIL.format(
                   save_steps=50000, lr="2e-5"),
               "finetune_lora.sh": LLAVA15_FINETUNE.format(
                   lora="    --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \\\n",
                   out="llava-v1.5-13b-lora") + LLAVA15_TAIL.format(save_steps=50000, lr="2e-4")}
    for name, text in scripts.items():
        (root / name).write_text(text)
        _run(["bash", name], _env(), root, tmp_path / f"{name}.log")
    ck = root / "checkpoints"
    monkeypatch.chdir(root)  # the saved configs name the tower by its (relative) hub id, as LLaVA's do
    for out in ("llava-v1.5-13b-pretrain", "llava-v1.5-13b", "llava-v1.5-13b-lora"):
        _two_steps(ck / out)
    _answers(ck / "llava-v1.5-13b-pretrain", model_base=d / "llm")
    model = _answers(ck / "llava-v1.5-13b")
    assert model.config.mm_vision_tower == "openai/clip-vit-large-patch14-336"
    assert model.config.mm_vision_tower_type == "hf_clip"
    _answers(ck / "llava-v1.5-13b-lora", model_base=d / "llm")


def test_legacy_flags_are_translated():
    argv, notes = translate_legacy_flags(["--warmup_ratio", "0.03", "--evaluation_strategy", "no", "--tf32", "True",
                                          "--bf16=True"], cuda=False)
    assert argv == ["--warmup_steps", "0.03", "--eval_strategy", "no", "--bf16=True", "--use_cpu", "True"]
    assert len(notes) == 4 and any("--tf32" in n for n in notes)
    argv, notes = translate_legacy_flags(["--warmup_ratio=0.1", "--tf32", "True", "--use_cpu", "False"], cuda=True)
    assert argv == ["--warmup_steps=0.1", "--tf32", "True", "--use_cpu", "False"]
    with pytest.raises(ArgumentError, match="--warmup_ratio 3"):
        translate_legacy_flags(["--warmup_ratio", "3"])


@pytest.mark.parametrize("flags, message", [
    (["--bits", "4"], "--bits 4: 4/8-bit"),
    (["--bits", "8"], "--bits 8: 4/8-bit"),
    (["--no_such_flag", "1"], "--no_such_flag"),
    (["--image_aspect_ratio", "anyres"], "anyres"),
])
def test_unsupported_flags_are_refused_by_name(flags, message, tmp_path):
    with pytest.raises(ArgumentError, match=message):
        parse_args(["--model_name_or_path", "x", "--output_dir", str(tmp_path), *flags])


def test_refusal_is_a_one_line_error_from_the_script(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "llava_drip" / "train" / "train.py"), "--model_name_or_path",
                           "x", "--output_dir", str(tmp_path), "--bits", "4"], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("train.py: error: --bits 4")

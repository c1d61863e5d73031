"""LLaVA training: both stages through the deepspeed launcher on 2 CPU ranks, LoRA save/load, bad samples."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_drip.conversation import get_conv_template
from llava_drip.data import synth_llava
from llava_drip.mm_utils import process_images, tokenizer_image_token
from llava_drip.train import tiny
from llava_drip.train.tiny_pipeline import save_random_tower

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava")
    synth_llava.main(["--out", str(d / "data"), "--n", "96", "--seed", "1", "--quiet"])
    lines = tiny.corpus_from_llava_json([str(d / "data" / "pretrain.json"), str(d / "data" / "finetune.json")])
    tiny.build_tiny_llm(str(d / "llm"), lines, lm_steps=60)
    save_random_tower("DRIP-4x-tiny", str(d / "tower.safetensors"))
    return d


def _common(work, out):
    return ["--model_name_or_path", str(work / "llm"), "--image_folder", str(work / "data"),
            "--vision_tower", "DRIP-4x-tiny", "--vision_tower_pretrained", str(work / "tower.safetensors"),
            "--mm_projector_type", "mlp2x_gelu", "--use_cpu", "True", "--report_to", "none",
            "--dataloader_num_workers", "0", "--logging_steps", "1", "--model_max_length", "320",
            "--save_strategy", "no", "--output_dir", str(out), "--disable_tqdm", "True", "--seed", "0"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed(args, log):
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
           str(REPO / "llava_drip" / "train" / "train.py")] + args
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    log.write_text(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def _losses(out):
    return json.load(open(out / "train_summary.json"))["losses"]


def _falls(losses):
    k = max(2, len(losses) // 4)
    return sum(losses[-k:]) / k < sum(losses[:k]) / k


@pytest.mark.slow
def test_two_stages_under_deepspeed_two_ranks(work):
    s1 = work / "stage1"
    _deepspeed(["--deepspeed", str(REPO / "scripts" / "zero2.json"), *_common(work, s1), "--version", "plain",
                "--data_path", str(work / "data" / "pretrain.json"), "--tune_mm_mlp_adapter", "True",
                "--num_train_epochs", "1", "--per_device_train_batch_size", "4", "--learning_rate", "2e-3"],
               work / "stage1.log")
    assert (s1 / "mm_projector.bin").is_file() and (s1 / "mm_projector.safetensors").is_file()
    proj = torch.load(s1 / "mm_projector.bin", weights_only=True)
    assert set(proj) == {"model.mm_projector.0.weight", "model.mm_projector.0.bias",
                         "model.mm_projector.2.weight", "model.mm_projector.2.bias"}
    assert _falls(_losses(s1)), _losses(s1)

    s2 = work / "stage2"
    _deepspeed(["--deepspeed", str(REPO / "scripts" / "zero3.json"), *_common(work, s2), "--version", "v1",
                "--data_path", str(work / "data" / "finetune.json"), "--pretrain_mm_mlp_adapter",
                str(s1 / "mm_projector.bin"), "--image_aspect_ratio", "pad", "--group_by_modality_length", "True",
                "--num_train_epochs", "1", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3"],
               work / "stage2.log")
    assert (s2 / "model.safetensors").is_file()
    assert _falls(_losses(s2)), _losses(s2)
    from llava_drip.model.builder import load_pretrained_model
    tok, model, proc, _ = load_pretrained_model(str(s2))
    assert model.config.model_type == "llava_llama" and model.config.mm_vision_tower == "DRIP-4x-tiny"
    # the stage-1 folder loads as projector + base
    tok1, model1, _, _ = load_pretrained_model(str(s1), model_base=str(work / "llm"))
    torch.testing.assert_close(model1.get_model().mm_projector[0].weight, proj["model.mm_projector.0.weight"])


def _greedy(model, tok, proc, image_paths, question="What shape is shown?"):
    conv = get_conv_template("vicuna_v1")
    conv.append_message("USER", "<image>\n" + question)
    conv.append_message("ASSISTANT", None)
    ids = tokenizer_image_token(conv.get_prompt(), tok, return_tensors="pt")
    images = process_images([Image.open(p) for p in image_paths], proc, model.config)
    out = model.generate(ids[None].repeat(len(image_paths), 1), images=images, max_new_tokens=12, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return [tok.decode(o, skip_special_tokens=True) for o in out]


def test_lora_stage2_save_load_identical_generation(work, tmp_path):
    from llava_drip.model.builder import load_pretrained_model
    from llava_drip.train.train import train
    out = tmp_path / "lora"
    trainer = train([*_common(work, out), "--version", "v1", "--data_path", str(work / "data" / "finetune.json"),
                     "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--mm_projector_lr", "2e-3",
                     "--image_aspect_ratio", "pad", "--max_steps", "6", "--per_device_train_batch_size", "4",
                     "--learning_rate", "2e-3"])
    assert {"adapter_config.json", "non_lora_trainables.safetensors", "config.json"} <= set(os.listdir(out))
    adapter_cfg = json.load(open(out / "adapter_config.json"))
    # LoRA only on the LLM's layers, never on the tower or the projector
    lora_names = [n for n, _ in trainer.model.named_parameters() if "lora_" in n]
    assert lora_names and not any("vision_tower" in n or "mm_projector" in n for n in lora_names)
    import re
    target = adapter_cfg["target_modules"]  # a regex over full module paths: the LLM's layers only
    assert re.fullmatch(target, "model.layers.0.self_attn.q_proj") and re.fullmatch(target, "model.layers.1.mlp.down_proj")
    assert not re.fullmatch(target, "model.vision_tower.vision_tower.post_blocks.0.mlp.c_fc")
    assert not re.fullmatch(target, "model.mm_projector.0") and not re.fullmatch(target, "lm_head")
    model = trainer.model.eval()
    images = sorted((work / "data" / "images").glob("*.png"))[:2]
    proc = model.get_base_model().get_vision_tower().image_processor
    tok = trainer.processing_class
    before = _greedy(model, tok, proc, images)
    tok2, loaded, proc2, _ = load_pretrained_model(str(out), model_base=str(work / "llm"))
    after = _greedy(loaded, tok2, proc2, images)
    assert before == after


def test_bad_samples_are_counted_and_reported(work, tmp_path):
    from llava_drip.train.train import train
    data = tmp_path / "data"
    shutil.copytree(work / "data" / "images", data / "images")
    good = [r for r in json.load(open(work / "data" / "finetune.json")) if "image" in r][:12]
    (data / "images" / "broken.png").write_bytes(b"not a png at all")
    bad = [
        {"id": "missing-image", "image": "images/nope.png", "conversations": good[0]["conversations"]},
        {"id": "unreadable", "image": "images/broken.png", "conversations": good[0]["conversations"]},
        # LLaVA moves an <image> to the front of its turn; in two turns it stays two images
        {"id": "two-image-tokens", "image": good[1]["image"], "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A circle."},
            {"from": "human", "value": "And <image>?"}, {"from": "gpt", "value": "A square."}]},
        {"id": "no-answer", "image": good[1]["image"], "conversations": [{"from": "human", "value": "<image>\nHi"}]},
        {"id": "truncated-away", "conversations": [
            {"from": "human", "value": "word " * 400}, {"from": "gpt", "value": "never seen"}]},
    ]
    (data / "mixed.json").write_text(json.dumps(good + bad))
    out = tmp_path / "run"
    args = [*_common(work, out), "--image_folder", str(data), "--version", "v1",
            "--data_path", str(data / "mixed.json"), "--num_train_epochs", "1",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-3"]
    train(args)
    summary = json.load(open(out / "train_summary.json"))
    assert set(summary["skipped_ids"]) == {b["id"] for b in bad}
    assert "image file missing" in summary["reasons"]["missing-image"]
    assert "unreadable image" in summary["reasons"]["unreadable"]
    assert "2 '<image>' tokens" in summary["reasons"]["two-image-tokens"]
    assert "truncation" in summary["reasons"]["truncated-away"]
    assert all(l > 0 for l in summary["losses"])  # never a silent zero loss
    with pytest.raises(ValueError, match="missing-image"):
        train([*args, "--strict", "True", "--output_dir", str(tmp_path / "strict")])


def test_stage2_resumes_from_checkpoint(work, tmp_path):
    """An interrupted stage 2 rerun into the same folder continues from checkpoint-N with the same losses."""
    from llava_drip.train.train import train
    args = lambda out: [*_common(work, out), "--version", "v1", "--data_path", str(work / "data" / "finetune.json"),
                        "--image_aspect_ratio", "pad", "--max_steps", "4", "--per_device_train_batch_size", "4",
                        "--learning_rate", "1e-3", "--save_strategy", "steps", "--save_steps", "2"]
    straight = tmp_path / "straight"
    train(args(straight))
    assert {"checkpoint-2", "checkpoint-4"} <= set(os.listdir(straight))
    # simulate a crash after step 2: only checkpoint-2 survives
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    train(args(resumed))
    state = json.load(open(resumed / "checkpoint-4" / "trainer_state.json"))
    assert state["global_step"] == 4
    ref = {h["step"]: h["loss"] for h in json.load(open(straight / "checkpoint-4" / "trainer_state.json"))["log_history"]
           if "loss" in h}
    got = {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}
    assert set(got) == {1, 2, 3, 4}
    for step in (3, 4):  # trained after the resume
        assert got[step] == pytest.approx(ref[step], rel=1e-4)


def test_budgets_in_training_and_generate(work, tmp_path):
    """--drip_train_budgets: each image sample draws one; --drip_budget is saved; generate takes any budget."""
    from llava_drip.model.builder import load_pretrained_model
    from llava_drip.train.train import train
    out = tmp_path / "budgets"
    trainer = train([*_common(work, out), "--version", "v1", "--data_path", str(work / "data" / "finetune.json"),
                     "--image_aspect_ratio", "pad", "--max_steps", "2", "--per_device_train_batch_size", "4",
                     "--learning_rate", "1e-3", "--drip_train_budgets", "1.0,0.25,0.1", "--drip_budget", "0.5"])
    ds = trainer.train_dataset
    drawn = [ds[i].get("budget") for i in range(len(ds)) if "image" in ds.records[i]]
    assert set(drawn) == {"1.0", "0.25", "0.1"}  # every listed budget is drawn (str(Budget) form)
    batch = trainer.data_collator([ds[i] for i in range(4)])
    assert len(batch["budgets"]) == 4
    with torch.no_grad():
        embeds, *_ = trainer.model.prepare_inputs_labels_for_multimodal(
            batch["input_ids"], batch["attention_mask"], batch["labels"], batch["images"], budget=batch["budgets"])
    assert embeds.shape[0] == 4
    assert json.load(open(out / "config.json"))["mm_drip_budget"] == "0.5"

    tok, model, proc, _ = load_pretrained_model(str(out))
    assert model.get_vision_tower().budget is not None and str(model.get_vision_tower().budget) == "0.5"
    ids = tokenizer_image_token("<image>\nWhat shape is shown?", tok, return_tensors="pt")[None]
    images = process_images([Image.open(sorted((work / "data" / "images").glob("*.png"))[0])], proc, model.config)
    n = model.get_vision_tower().num_patches
    lengths = {}
    for budget in (None, 0.1, 1.0, 5):
        emb, mask, _, _ = model.prepare_inputs_labels_for_multimodal(ids, None, None, images, budget=budget)
        lengths[budget] = int(mask.sum()) - (ids.shape[1] - 1)  # visual tokens spliced in for the sentinel
    assert lengths == {None: round(0.5 * n), 0.1: round(0.1 * n), 1.0: n, 5: 5}
    out_ids = model.generate(ids, images=images, budget=0.1, max_new_tokens=3, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert out_ids.shape[0] == 1
    with pytest.raises(ValueError, match="budget"):
        model.generate(ids, images=images, budget="2.0", max_new_tokens=3)

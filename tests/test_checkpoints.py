"""Checkpoints cross both ways: what training saves carries LLaVA's file names, keys and config fields, and
the loader reads this project's folders of every kind and LLaVA-format folders (HF CLIP tower)."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_drip.conversation import get_conv_template
from llava_drip.data import synth_llava
from llava_drip.mm_utils import process_images, tokenizer_image_token
from llava_drip.model.builder import load_pretrained_model
from llava_drip.train import tiny
from llava_drip.train.train import _OLD_PEFT_FIELDS, train

# the config fields LLaVA's builder and train.py read (llava/model/builder.py, llava/train/train.py)
LLAVA_FIELDS = {"mm_vision_tower": None, "mm_hidden_size": None, "mm_projector_type": "mlp2x_gelu",
                "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
                "mm_use_im_patch_token": False, "use_mm_proj": True, "mm_patch_merge_type": "flat",
                "image_aspect_ratio": "pad", "image_grid_pinpoints": None, "tune_mm_mlp_adapter": None,
                "freeze_mm_mlp_adapter": False, "tokenizer_model_max_length": 256,
                "tokenizer_padding_side": "right", "mm_projector_lr": None}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    synth_llava.main(["--out", str(d / "data"), "--n", "48", "--seed", "3", "--quiet"])
    lines = tiny.corpus_from_llava_json([str(d / "data" / "pretrain.json"), str(d / "data" / "finetune.json")])
    tiny.build_tiny_llm(str(d / "llm"), lines, lm_steps=0)
    tiny.build_tiny_hf_clip(str(d / "clip"))
    return d


def _args(work, out, *extra):
    return ["--model_name_or_path", str(work / "llm"), "--image_folder", str(work / "data"),
            "--vision_tower", str(work / "clip"), "--mm_vision_select_layer", "-2",
            "--mm_projector_type", "mlp2x_gelu", "--report_to", "none", "--dataloader_num_workers", "0",
            "--model_max_length", "256", "--save_strategy", "no", "--output_dir", str(out),
            "--disable_tqdm", "True", "--seed", "0", "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-3", *extra]


@pytest.fixture(scope="module")
def runs(work):
    """Stage 1, LoRA stage 2 and full stage 2 with an HF CLIP tower, two steps each."""
    s1 = work / "stage1"
    train(_args(work, s1, "--version", "plain", "--data_path", str(work / "data" / "pretrain.json"),
                "--tune_mm_mlp_adapter", "True"))
    stage2 = ["--version", "v1", "--data_path", str(work / "data" / "finetune.json"), "--image_aspect_ratio", "pad",
              "--pretrain_mm_mlp_adapter", str(s1 / "mm_projector.bin")]
    lora = train(_args(work, work / "lora", *stage2, "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16"))
    full = train(_args(work, work / "full", *stage2))
    return {"stage1": s1, "lora": work / "lora", "full": work / "full",
            "lora_model": lora.model.eval(), "full_model": full.model.eval()}


def _inputs(work, tok, proc, cfg, n=2):
    conv = get_conv_template("vicuna_v1")
    conv.append_message(conv.roles[0], "<image>\nWhat shape is shown?")
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tok, return_tensors="pt")
    paths = sorted((work / "data" / "images").glob("*.png"))[:n]
    return ids[None].repeat(n, 1), process_images([Image.open(p) for p in paths], proc, cfg)


@torch.no_grad()
def _logits(model, ids, images):
    return model(input_ids=ids, images=images).logits.float()


def _check_llava_config(folder: Path, clip: Path, **override):
    cfg = json.load(open(folder / "config.json"))
    want = dict(LLAVA_FIELDS, mm_vision_tower=str(clip), mm_hidden_size=64, **override)
    got = {k: cfg.get(k, "<absent>") for k in want}
    for k, v in want.items():
        if v is not None:
            assert got[k] == v, (k, got[k])
        else:
            assert k in cfg, k
    assert cfg["mm_vision_tower_type"] == "hf_clip"  # resolved once, at training time
    assert cfg["model_type"] == "llava_llama"


def test_stage1_projector_folder_with_hf_clip(work, runs):
    s1 = runs["stage1"]
    assert {"mm_projector.bin", "mm_projector.safetensors", "config.json", "tokenizer.model"} <= set(os.listdir(s1))
    _check_llava_config(s1, work / "clip", image_aspect_ratio="square")  # stage 1 runs without --image_aspect_ratio
    assert json.load(open(s1 / "config.json"))["tune_mm_mlp_adapter"] is True
    proj = torch.load(s1 / "mm_projector.bin", weights_only=True)
    tok, model, proc, _ = load_pretrained_model(str(s1), model_base=str(work / "llm"))
    torch.testing.assert_close(model.get_model().mm_projector[2].weight, proj["model.mm_projector.2.weight"])
    # the frozen tower is the HF CLIP folder's, loaded from its source
    from transformers import CLIPVisionModel
    ref = CLIPVisionModel.from_pretrained(str(work / "clip")).state_dict()
    got = model.get_vision_tower().vision_tower.state_dict()
    assert set(ref) == set(got)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])


def test_lora_folder_llava_layout_and_reload(work, runs):
    out, trained = runs["lora"], runs["lora_model"]
    files = set(os.listdir(out))
    assert {"adapter_config.json", "non_lora_trainables.bin", "non_lora_trainables.safetensors",
            "config.json", "tokenizer.model"} <= files
    _check_llava_config(out, work / "clip")
    # LoRA only on the LLM's own Linear layers: the CLIP encoder's q/k/v/out_proj and the projector untouched
    lora_names = [n for n, _ in trained.named_parameters() if "lora_" in n]
    assert lora_names and not any("vision_tower" in n or "mm_projector" in n for n in lora_names)
    wrapped = {n.split(".lora_")[0] for n in lora_names}
    assert {f"base_model.model.model.layers.{i}.{m}" for i in range(2) for m in
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")} == wrapped
    adapter_cfg = json.load(open(out / "adapter_config.json"))
    assert set(adapter_cfg) <= _OLD_PEFT_FIELDS, set(adapter_cfg) - _OLD_PEFT_FIELDS  # older peft reads it
    assert adapter_cfg["r"] == 8 and adapter_cfg["peft_type"] == "LORA"
    # LLaVA's names: the PeftModel's parameter names; its builder strips 'base_model.' then 'model.'
    non_lora = torch.load(out / "non_lora_trainables.bin", weights_only=True)
    assert set(non_lora) == {f"base_model.model.model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    stripped = {k[len("base_model."):]: v for k, v in non_lora.items()}
    stripped = {k[len("model."):]: v for k, v in stripped.items()}
    own = trained.get_base_model().state_dict()
    for k, v in stripped.items():
        torch.testing.assert_close(own[k], v)
    tok, loaded, proc, _ = load_pretrained_model(str(out), model_base=str(work / "llm"))
    ids, images = _inputs(work, tok, proc, loaded.config)
    torch.testing.assert_close(_logits(loaded, ids, images), _logits(trained, ids, images), rtol=1e-4, atol=1e-4)


def test_full_folder_llava_layout_and_reload(work, runs):
    out, trained = runs["full"], runs["full_model"]
    assert {"model.safetensors", "config.json", "tokenizer.model", "tokenizer_config.json"} <= set(os.listdir(out))
    _check_llava_config(out, work / "clip")
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # LLaVA's names for the LLM and the projector; LLaVA's builder loads the tower from mm_vision_tower
    assert {"model.mm_projector.0.weight", "model.mm_projector.2.bias", "model.embed_tokens.weight",
            "model.layers.1.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"} <= keys
    assert any(k.startswith("model.vision_tower.vision_tower.") for k in keys)
    tok, loaded, proc, _ = load_pretrained_model(str(out))
    ids, images = _inputs(work, tok, proc, loaded.config)
    torch.testing.assert_close(_logits(loaded, ids, images), _logits(trained, ids, images), rtol=1e-4, atol=1e-4)


# config.json as LLaVA-1.5's train.py writes it (liuhaotian/llava-v1.5-7b), sized down to the tiny model
def _llava15_config(own: dict, clip: Path) -> dict:
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "rms_norm_eps", "vocab_size", "bos_token_id", "eos_token_id", "mm_hidden_size")
    cfg = {"_name_or_path": "./checkpoints/vicuna-7b-v1-5", "architectures": ["LlavaLlamaForCausalLM"],
           "freeze_mm_mlp_adapter": False, "hidden_act": "silu", "image_aspect_ratio": "pad",
           "image_grid_pinpoints": None, "initializer_range": 0.02, "mm_projector_type": "mlp2x_gelu",
           "mm_resampler_type": None, "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
           "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "mm_vision_tower": str(clip),
           "model_type": "llava", "pad_token_id": 0, "pretraining_tp": 1, "rope_scaling": None,
           "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.31.0",
           "tune_mm_mlp_adapter": False, "tune_mm_vision_resampler": False, "unfreeze_mm_vision_tower": False,
           "use_cache": True, "use_mm_proj": True}
    cfg.update({k: own[k] for k in keep})
    return cfg


def _llava_tokenizer_files(src: Path, dst: Path):
    """What LLaVA's hub folders hold: the sentencepiece model and a slow-tokenizer config, no tokenizer.json."""
    shutil.copy(src / "tokenizer.model", dst / "tokenizer.model")
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "clean_up_tokenization_spaces": False,
        "eos_token": "</s>", "legacy": False, "model_max_length": 2048, "pad_token": None, "padding_side": "right",
        "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>"}))
    (dst / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}))


def _write_llava_full(work, runs, dst: Path, drop=()):
    dst.mkdir()
    # tower keys as transformers 4.x (LLaVA's) names them: CLIPVisionModel.vision_model.*
    sd = {k.replace("model.vision_tower.vision_tower.", "model.vision_tower.vision_tower.vision_model."): v
          for k, v in runs["full_model"].state_dict().items() if not k.startswith(tuple(drop))}
    names = sorted(sd)
    half = len(names) // 2
    index = {"metadata": {"total_size": 0}, "weight_map": {}}
    for i, part in enumerate((names[:half], names[half:]), 1):  # sharded .bin, as on the hub
        fname = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: sd[k].clone() for k in part}, dst / fname)
        index["weight_map"].update({k: fname for k in part})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    own = json.load(open(runs["full"] / "config.json"))
    (dst / "config.json").write_text(json.dumps(_llava15_config(own, work / "clip")))
    _llava_tokenizer_files(work / "llm", dst)


def test_llava_format_full_folder_loads(work, runs, tmp_path):
    _write_llava_full(work, runs, tmp_path / "llava-v1.5-tiny")
    tok, model, proc, _ = load_pretrained_model(str(tmp_path / "llava-v1.5-tiny"))
    ref_tok, ref, ref_proc, _ = load_pretrained_model(str(runs["full"]))
    assert len(tok) == len(ref_tok) == model.get_input_embeddings().weight.shape[0]  # no vocabulary growth
    ids, images = _inputs(work, tok, proc, model.config)
    ref_ids, _ = _inputs(work, ref_tok, ref_proc, ref.config)
    assert ids[0].tolist() == ref_ids[0].tolist(), (tok.convert_ids_to_tokens([i for i in ids[0] if i >= 0]),
                                                     ref_tok.convert_ids_to_tokens([i for i in ref_ids[0] if i >= 0]))
    torch.testing.assert_close(_logits(model, ids, images), _logits(ref, ids, images))


def test_llava_format_full_without_tower_weights_loads_tower_from_source(work, runs, tmp_path):
    _write_llava_full(work, runs, tmp_path / "no-tower", drop=("model.vision_tower.",))
    tok, model, proc, _ = load_pretrained_model(str(tmp_path / "no-tower"))
    ref_tok, ref, _, _ = load_pretrained_model(str(runs["full"]))
    ids, images = _inputs(work, tok, proc, model.config)
    torch.testing.assert_close(_logits(model, ids, images), _logits(ref, ids, images))


def test_llava_format_full_missing_llm_tensor_is_refused(work, runs, tmp_path):
    _write_llava_full(work, runs, tmp_path / "broken", drop=("model.layers.1.mlp.down_proj",))
    with pytest.raises(RuntimeError, match=r"missing \['model.layers.1.mlp.down_proj.weight'\]"):
        load_pretrained_model(str(tmp_path / "broken"))


def test_llava_format_lora_folder_loads(work, runs, tmp_path):
    """A LoRA folder as LLaVA + older peft write it: adapter_model.bin, a minimal adapter_config.json,
    non_lora_trainables.bin only, LLaVA-1.5's config.json, no tokenizer."""
    src, dst = runs["lora"], tmp_path / "llava-v1.5-tiny-lora"
    dst.mkdir()
    from safetensors.torch import load_file
    torch.save(load_file(src / "adapter_model.safetensors"), dst / "adapter_model.bin")
    cfg = json.load(open(src / "adapter_config.json"))
    old = {k: cfg[k] for k in ("peft_type", "task_type", "inference_mode", "base_model_name_or_path", "r",
                               "target_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias",
                               "modules_to_save")}
    (dst / "adapter_config.json").write_text(json.dumps(old))
    shutil.copy(src / "non_lora_trainables.bin", dst / "non_lora_trainables.bin")
    own = json.load(open(src / "config.json"))
    (dst / "config.json").write_text(json.dumps(_llava15_config(own, work / "clip")))
    tok, model, proc, _ = load_pretrained_model(str(dst), model_base=str(work / "llm"))
    ref_tok, ref, _, _ = load_pretrained_model(str(src), model_base=str(work / "llm"))
    ids, images = _inputs(work, tok, proc, model.config)
    torch.testing.assert_close(_logits(model, ids, images), _logits(ref, ids, images))


def test_hub_id_that_cannot_be_fetched_names_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="liuhaotian/llava-v1.5-7b"):
        load_pretrained_model("liuhaotian/llava-v1.5-7b")


# ---- a full stage-2 folder whose weights do not match (the shipped tiny DRIP model, edited) ----

def _shipped_variant(tmp_path: Path, drop=(), add=None, config=None) -> Path:
    """A copy of the shipped tiny LLaVA-DRIP folder, model.safetensors rewritten without `drop` and with `add`."""
    from safetensors.torch import load_file, save_file
    from llava_drip.train.builtin_model import SHIPPED
    dst = tmp_path / "stage2"
    shutil.copytree(SHIPPED, dst)
    sd = load_file(dst / "model.safetensors")
    for k in drop:
        del sd[k]
    sd.update(add or {})
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    return dst


def _shipped_state():
    from llava_drip.train.builtin_model import SHIPPED
    return load_pretrained_model(str(SHIPPED))[1].state_dict()


def test_full_folder_missing_tensor_is_refused_unless_not_strict(tmp_path, caplog):
    key = "model.layers.0.mlp.down_proj.weight"
    folder = _shipped_variant(tmp_path, drop=[key])
    with pytest.raises(RuntimeError, match=rf"{folder}: weights do not match the model: missing \['{key}'\] \(1\)"
                                           rf".*strict=False"):
        load_pretrained_model(str(folder))
    _, model, _, _ = load_pretrained_model(str(folder), strict=False)
    assert any(key in r.getMessage() and "strict=False" in r.getMessage() for r in caplog.records
               if r.levelname == "WARNING")
    want, got = _shipped_state(), model.state_dict()
    assert not torch.equal(got[key], want[key])  # the gap is not the shipped weight: it was never loaded
    for k in want.keys() - {key}:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, equal_nan=True)


def test_full_folder_unexpected_tensor_is_refused_unless_not_strict(tmp_path):
    folder = _shipped_variant(tmp_path, add={"model.mm_projector.9.weight": torch.zeros(4, 4),
                                             "model.extra_head.weight": torch.zeros(3)})
    with pytest.raises(RuntimeError, match=r"missing \[\] \(0\), unexpected \['model.extra_head.weight', "
                                           r"'model.mm_projector.9.weight'\] \(2\)"):
        load_pretrained_model(str(folder))
    got, want = load_pretrained_model(str(folder), strict=False)[1].state_dict(), _shipped_state()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, equal_nan=True)


def test_full_folder_with_part_of_the_tower_is_refused(tmp_path):
    """Not replaced by the tower's source: that would drop the folder's own tower weights without a word."""
    key = "model.vision_tower.vision_tower.boundary_predictor.fc1.weight"
    folder = _shipped_variant(tmp_path, drop=[key])
    with pytest.raises(RuntimeError, match=rf"{folder}: .*the vision tower is only partly in the folder.*\['{key}'\]"):
        load_pretrained_model(str(folder))


def test_full_folder_legitimate_absences_load(tmp_path):
    """Tied lm_head, rebuilt rotary buffers and pre-calibration DRIP folders are not mismatches."""
    tower = "model.vision_tower.vision_tower."
    folder = _shipped_variant(tmp_path, drop=["lm_head.weight", tower + "calib_quantiles", tower + "calib_target"],
                              add={"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)},
                              config={"tie_word_embeddings": True})
    _, model, _, _ = load_pretrained_model(str(folder))
    torch.testing.assert_close(model.lm_head.weight, model.get_input_embeddings().weight, rtol=0, atol=0)
    drip = model.get_vision_tower().vision_tower
    assert not drip.is_calibrated and float(drip.calib_target) == drip.prior

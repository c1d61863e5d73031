"""LLaVA over Qwen2 and Mistral: tiny LLMs built from configs, both training stages, LoRA, save/load,
generation with an image, the qwen_2 / mistral_instruct templates, their label masks and the -200 sentinel."""
import json
import os

import pytest
import torch
from PIL import Image

from llava_drip.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_drip.conversation import conv_templates, get_conv_template, next_conv_templates
from llava_drip.data import synth_llava
from llava_drip.mm_utils import process_images, tokenizer_image_token
from llava_drip.model import (LlavaConfig, LlavaLlamaForCausalLM, LlavaMistralConfig, LlavaMistralForCausalLM,
                              LlavaQwen2ForCausalLM, LlavaQwenConfig, LlavaQwenForCausalLM)
from llava_drip.train import tiny
from llava_drip.train.data import BadSample, preprocess
from llava_drip.train.tiny_pipeline import save_random_tower

# arch -> (template, LLaVA model class, model_type)
LLMS = {"qwen2": ("qwen_2", LlavaQwenForCausalLM, "llava_qwen"),
        "mistral": ("mistral_instruct", LlavaMistralForCausalLM, "llava_mistral")}
QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
RECORD = [{"from": "human", "value": "What shape is it? <image>"}, {"from": "gpt", "value": "A red circle."},
          {"from": "human", "value": "And the background?"}, {"from": "gpt", "value": "It is blue, 2 squares."}]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("llms")
    synth_llava.main(["--out", str(d / "data"), "--n", "32", "--seed", "2", "--quiet"])
    lines = tiny.corpus_from_llava_json([str(d / "data" / "pretrain.json"), str(d / "data" / "finetune.json")])
    for arch in LLMS:
        tiny.build_tiny_llm(str(d / arch), lines, arch=arch)
    save_random_tower("DRIP-4x-tiny", str(d / "tower.safetensors"))
    return d


def _tok(work, arch):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(work / arch))
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    return tok


def _supervised(tok, ids, labels):
    """Decoded supervised runs, one string per contiguous run."""
    runs, cur = [], []
    for i, l in zip(ids.tolist(), labels.tolist()):
        if l == IGNORE_INDEX:
            if cur:
                runs.append(tok.decode(cur))
            cur = []
        else:
            assert l == i  # a supervised label is its own input token (the model shifts)
            cur.append(l)
    if cur:
        runs.append(tok.decode(cur))
    return runs


# ---- registration, classes, templates -------------------------------------------------------------------
def test_classes_registered_and_share_the_llava_code():
    from transformers import AutoConfig, AutoModelForCausalLM
    assert LlavaQwen2ForCausalLM is LlavaQwenForCausalLM
    from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
    for model_type, cfg_cls, model_cls, hf_cls in (
            ("llava_llama", LlavaConfig, LlavaLlamaForCausalLM, LlamaForCausalLM),
            ("llava_qwen", LlavaQwenConfig, LlavaQwenForCausalLM, Qwen2ForCausalLM),
            ("llava_mistral", LlavaMistralConfig, LlavaMistralForCausalLM, MistralForCausalLM)):
        cfg = AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
        assert type(cfg) is cfg_cls and cfg.mm_projector_type == "linear" and cfg.mm_use_im_patch_token is False
        model = AutoModelForCausalLM.from_config(cfg)
        assert type(model) is model_cls
        # one forward / generate for every family, from the mixin; the HF class is reached through super()
        for name in ("forward", "generate", "__init__", "prepare_inputs_labels_for_multimodal"):
            assert name not in vars(model_cls), (model_cls.__name__, name)
        # weights keep the HF layout: the same names as the plain HF model's
        assert isinstance(model, hf_cls) and set(model.state_dict()) == set(hf_cls(cfg).state_dict())


def test_templates_render_as_llava_next():
    assert "qwen_2" not in conv_templates and {"qwen_1_5", "qwen_2"} <= set(next_conv_templates)
    conv = get_conv_template("qwen_2")
    assert conv.version == "qwen" and conv.stop_str == "<|im_end|>"
    conv.append_message(conv.roles[0], "<image>\nQ1")
    conv.append_message(conv.roles[1], "A1")
    conv.append_message(conv.roles[0], "Q2")
    conv.append_message(conv.roles[1], None)
    # LLaVA-NeXT's CHATML rendering: system<|im_end|>\n, then role\nmessage<|im_end|>\n, open role\n
    assert conv.get_prompt() == (QWEN_SYSTEM + "<|im_start|>user\n<image>\nQ1<|im_end|>\n<|im_start|>assistant\nA1"
                                 "<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n")
    assert get_conv_template("qwen_1_5").get_prompt() == QWEN_SYSTEM
    conv = get_conv_template("mistral_instruct")
    conv.append_message(conv.roles[0], "<image>\nQ1")
    conv.append_message(conv.roles[1], "A1")
    conv.append_message(conv.roles[0], "Q2")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == "[INST] <image>\nQ1 [/INST] A1 </s>[INST] Q2 [/INST]"
    assert next_conv_templates["llava_mistral_instruct"] is conv_templates["mistral_instruct"]
    with pytest.raises(ValueError, match="qwen_2"):
        get_conv_template("qwen_3")


# ---- tokenizers, sentinel, labels -----------------------------------------------------------------------
def test_qwen_tokenizer_folder_is_byte_level_bpe(work):
    tok = _tok(work, "qwen2")
    files = set(os.listdir(work / "qwen2"))
    assert {"tokenizer.json", "vocab.json", "merges.txt"} <= files and "tokenizer.model" not in files
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert tok.bos_token is None and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert tok.convert_tokens_to_ids(special) in tok.all_special_ids
        assert tok(special).input_ids == [tok.convert_tokens_to_ids(special)]
    text = "héllo wörld 😀 <b>"  # bytes the corpus never had still round-trip
    assert tok.decode(tok(text).input_ids) == text
    cfg = json.load(open(work / "qwen2" / "config.json"))
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True
    assert json.load(open(work / "mistral" / "config.json"))["model_type"] == "mistral"


@pytest.mark.parametrize("arch", sorted(LLMS))
def test_image_sentinel_positions(work, arch):
    tok = _tok(work, arch)
    conv = get_conv_template(LLMS[arch][0])
    conv.append_message(conv.roles[0], "<image>\nWhat shape is shown?")
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    before, after = prompt.split("<image>")
    ids = tokenizer_image_token(prompt, tok)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    p = ids.index(IMAGE_TOKEN_INDEX)
    head, tail = tok(before).input_ids, tok(after).input_ids
    if arch == "qwen2":  # no BOS: nothing dropped from either chunk
        assert tok("a").input_ids[0] != tok.bos_token_id
        assert ids == head + [IMAGE_TOKEN_INDEX] + tail
    else:  # BOS kept once, at the front; the later chunk's own BOS dropped
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert ids == head + [IMAGE_TOKEN_INDEX] + tail[1:]
    assert p == len(head)
    # a tensor, and an image-only prompt
    assert torch.equal(tokenizer_image_token(prompt, tok, return_tensors="pt"), torch.tensor(ids))
    assert tokenizer_image_token("<image>", tok) == ([IMAGE_TOKEN_INDEX] if arch == "qwen2"
                                                     else [tok.bos_token_id, IMAGE_TOKEN_INDEX])


@pytest.mark.parametrize("arch", sorted(LLMS))
def test_labels_supervise_only_answers(work, arch):
    tok = _tok(work, arch)
    conv = get_conv_template(LLMS[arch][0])
    ids, labels = preprocess(RECORD, conv, tok, has_image=True)
    end = "<|im_end|>" if arch == "qwen2" else " </s>"  # the stop each answer is trained to emit
    assert _supervised(tok, ids, labels) == ["A red circle." + end, "It is blue, 2 squares." + end]
    assert ids.tolist().count(IMAGE_TOKEN_INDEX) == 1 and labels[ids == IMAGE_TOKEN_INDEX].item() == IGNORE_INDEX
    # the ids are the prompt's own tokens (what generation sees)
    c = conv.copy()
    for j, turn in enumerate(RECORD):
        value = turn["value"]
        if j == 0:
            value = "<image>\n" + value.replace("<image>", "").strip()
        c.append_message(c.roles[j % 2], value)
    assert ids.tolist() == tokenizer_image_token(c.get_prompt(), tok)
    # a leading gpt turn is dropped and a text-only record masks the same way
    text_only = [{"from": "gpt", "value": "Hi."}, {"from": "human", "value": "Name a colour."},
                 {"from": "gpt", "value": "Red."}]
    ids, labels = preprocess(text_only, conv, tok, has_image=False)
    assert _supervised(tok, ids, labels) == ["Red." + end]
    assert IMAGE_TOKEN_INDEX not in ids.tolist()


def test_qwen_labels_refuse_shifted_tokens():
    """Tokens that merge across the header / answer boundary would shift every later label: a bad sample."""
    import re
    vocab = {}

    class Merging:  # whitespace sticks to the next word, and no ChatML marker is special
        bos_token_id, pad_token_id, model_max_length = None, -1, 1024

        def __call__(self, text):
            class Enc:
                input_ids = [vocab.setdefault(w, len(vocab)) for w in re.findall(r"\s*\S+|\s+", text)]
            return Enc()

    with pytest.raises(BadSample, match="tokenization mismatch"):
        preprocess([{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], get_conv_template("qwen_2"),
                   Merging(), has_image=False, legacy=False)


# ---- training, save / load, generation ------------------------------------------------------------------
def _common(work, arch, out):
    return ["--model_name_or_path", str(work / arch), "--image_folder", str(work / "data"),
            "--vision_tower", "DRIP-4x-tiny", "--vision_tower_pretrained", str(work / "tower.safetensors"),
            "--mm_projector_type", "mlp2x_gelu", "--use_cpu", "True", "--report_to", "none",
            "--dataloader_num_workers", "0", "--logging_steps", "1", "--model_max_length", "320",
            "--save_strategy", "no", "--output_dir", str(out), "--disable_tqdm", "True", "--seed", "0",
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "2e-3"]


@pytest.fixture(scope="module")
def runs(work):
    """Per LLM: stage 1 (plain), full stage 2 and LoRA stage 2, two steps each."""
    from llava_drip.train.train import train
    out = {}
    for arch, (version, _, _) in LLMS.items():
        s1 = work / f"{arch}-stage1"
        train([*_common(work, arch, s1), "--version", "plain", "--data_path", str(work / "data" / "pretrain.json"),
               "--tune_mm_mlp_adapter", "True"])
        stage2 = ["--version", version, "--data_path", str(work / "data" / "finetune.json"),
                  "--image_aspect_ratio", "pad", "--pretrain_mm_mlp_adapter", str(s1 / "mm_projector.bin")]
        full = train([*_common(work, arch, work / f"{arch}-full"), *stage2])
        lora = train([*_common(work, arch, work / f"{arch}-lora"), *stage2, "--lora_enable", "True",
                      "--lora_r", "8", "--lora_alpha", "16"])
        out[arch] = {"stage1": s1, "full": work / f"{arch}-full", "lora": work / f"{arch}-lora",
                     "full_model": full.model.eval(), "lora_model": lora.model.eval(), "tok": full.processing_class}
    return out


def _inputs(model, tok, proc, work, arch, n=2):
    conv = get_conv_template(LLMS[arch][0])
    conv.append_message(conv.roles[0], "<image>\nWhat shape is shown?")
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tok, return_tensors="pt")
    paths = sorted((work / "data" / "images").glob("*.png"))[:n]
    return ids[None].repeat(n, 1), process_images([Image.open(p) for p in paths], proc, model.config)


def _greedy(model, tok, proc, work, arch):
    """Greedy new tokens (at least 6: a barely trained model may stop at once) and the prompt's logits."""
    ids, images = _inputs(model, tok, proc, work, arch)
    out = model.generate(ids, images=images, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert out.shape == (ids.shape[0], 6)
    with torch.no_grad():
        logits = model(input_ids=ids, images=images).logits.float()
    return out.tolist(), logits


@pytest.mark.parametrize("arch", sorted(LLMS))
def test_both_stages_save_load_generate(work, runs, arch):
    from llava_drip.model.builder import load_pretrained_model
    _, model_cls, model_type = LLMS[arch]
    r = runs[arch]
    for stage in ("stage1", "full", "lora"):
        summary = json.load(open(r[stage] / "train_summary.json"))
        assert summary["skipped"] == 0 and len(summary["losses"]) == 2, (stage, summary["reasons"])
        assert json.load(open(r[stage] / "config.json"))["model_type"] == model_type
    proj = torch.load(r["stage1"] / "mm_projector.bin", weights_only=True)
    assert set(proj) == {f"model.mm_projector.{i}.{k}" for i in (0, 2) for k in ("weight", "bias")}
    # stage 1: projector + base LLM folder; the saved config picks the class
    _, m1, _, _ = load_pretrained_model(str(r["stage1"]), model_base=str(work / arch))
    assert type(m1) is model_cls
    torch.testing.assert_close(m1.get_model().mm_projector[0].weight, proj["model.mm_projector.0.weight"])
    # stage 2, full: the same greedy answers before saving and after loading
    tok, model, proc, _ = load_pretrained_model(str(r["full"]))
    assert type(model) is model_cls and model.config.mm_vision_tower == "DRIP-4x-tiny"
    if arch == "qwen2":  # the tokenizer folder survives training: no tokenizer.model appears
        assert "tokenizer.model" not in os.listdir(r["full"]) and tok.eos_token == "<|im_end|>"
    trained = r["full_model"]
    before, logits = _greedy(trained, r["tok"], trained.get_vision_tower().image_processor, work, arch)
    after, logits_after = _greedy(model, tok, proc, work, arch)
    assert after == before
    torch.testing.assert_close(logits_after, logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(LLMS))
def test_lora_stage2_save_load_identical_generation(work, runs, arch):
    import re
    from llava_drip.model.builder import load_pretrained_model
    r = runs[arch]
    peft_model = r["lora_model"]
    target = json.load(open(r["lora"] / "adapter_config.json"))["target_modules"]
    assert re.fullmatch(target, "model.layers.0.self_attn.q_proj") and not re.fullmatch(target, "model.mm_projector.0")
    assert not any("vision_tower" in n or "mm_projector" in n for n, _ in peft_model.named_parameters() if "lora_" in n)
    proc = peft_model.get_base_model().get_vision_tower().image_processor
    before, logits = _greedy(peft_model, r["tok"], proc, work, arch)
    with peft_model.disable_adapter(), torch.no_grad():  # the adapters trained: they change the logits
        ids, images = _inputs(peft_model, r["tok"], proc, work, arch)
        assert not torch.allclose(peft_model(input_ids=ids, images=images).logits.float(), logits, atol=1e-4)
    tok, loaded, proc2, _ = load_pretrained_model(str(r["lora"]), model_base=str(work / arch))
    assert type(loaded) is LLMS[arch][1]
    after, logits_after = _greedy(loaded, tok, proc2, work, arch)
    assert after == before
    torch.testing.assert_close(logits_after, logits, rtol=1e-4, atol=1e-4)  # merged adapters: float rounding

"""Tiny base LLM for CPU runs: a sentencepiece tokenizer trained on the fly and a Llama built from a config.

`python -m llava_drip.train.tiny --out DIR [--data finetune.json ...]` writes an HF folder
(tokenizer + config + model.safetensors) that `--model_name_or_path` accepts like any Llama.
"""
import argparse
import json
import os
from typing import Iterable, List

TINY_LLAMA = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)


def corpus_from_llava_json(paths: Iterable[str]) -> List[str]:
    from llava_drip.conversation import conv_vicuna_v1  # here: it loads torch, and `--help` need not
    lines = [conv_vicuna_v1.system, "USER: ASSISTANT:"]
    for path in paths:
        for rec in json.load(open(path)):
            for turn in rec.get("conversations", []):
                lines.extend(turn["value"].replace("<image>", "").splitlines())
    return [l for l in lines if l.strip()]


def train_tokenizer(out_dir: str, lines: List[str], vocab_size: int = 512):
    """Byte-fallback BPE so any text (and any emoji a user types in the demo) tokenizes, with Llama's
    normalisation (digits split, whitespace kept as is: "USER: " ends in a lone "▁" as with Vicuna)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer
    os.makedirs(out_dir, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=os.path.join(out_dir, "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2, num_threads=1, split_digits=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity")
    os.remove(os.path.join(out_dir, "tokenizer.vocab"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                   "model_max_length": 1024, "legacy": False}, f)
    tok = AutoTokenizer.from_pretrained(out_dir, add_bos_token=True)
    tok.save_pretrained(out_dir)
    return tok


def pretrain_lm(model, tok, lines: List[str], steps: int, seed: int = 0, batch_size: int = 32, lr: float = 3e-3):
    """A short causal-LM pass over the corpus, standing in for the pretrained LLM LLaVA starts from."""
    import random
    import torch
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = None
    for step in range(steps):
        batch = rng.sample(lines, min(batch_size, len(lines)))
        enc = tok([l + tok.eos_token for l in batch], return_tensors="pt", padding=True, truncation=True, max_length=96)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (1 - step / steps)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach()) if loss is not None else None


def build_tiny_llm(out_dir: str, lines: List[str], vocab_size: int = 512, seed: int = 0, lm_steps: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = train_tokenizer(out_dir, lines, vocab_size)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=None, **TINY_LLAMA)
    model = LlamaForCausalLM(cfg)
    if lm_steps:
        tok.pad_token = tok.unk_token
        final = pretrain_lm(model, tok, lines, lm_steps, seed)
        print(f"text pretraining: {lm_steps} steps, final loss {final:.3f}")
        tok.pad_token = None
    model.save_pretrained(out_dir)
    return tok, model


def build_tiny_hf_clip(out_dir: str, image_size: int = 32, patch_size: int = 8, seed: int = 0) -> str:
    """A tiny transformers CLIPVisionModel + CLIPImageProcessor folder: a stand-in for LLaVA-1.5's
    openai/clip-vit-large-patch14-336 (same classes and file layout, random weights)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           image_size=image_size, patch_size=patch_size, projection_dim=64)
    CLIPVisionModel(cfg).save_pretrained(out_dir)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(out_dir)
    return out_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llava-drip tiny-llm", description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--data", nargs="*", default=[], help="LLaVA JSON files whose text trains the tokenizer")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lm-steps", type=int, default=0, help="causal-LM steps on the corpus text (0: random init)")
    args = p.parse_args(argv)
    from llava_drip.conversation import conv_vicuna_v1
    lines = corpus_from_llava_json(args.data) or [conv_vicuna_v1.system]
    tok, model = build_tiny_llm(args.out, lines, args.vocab_size, args.seed, args.lm_steps)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: vocab {len(tok)}, {n / 1e6:.2f} M parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

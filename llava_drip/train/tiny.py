"""Tiny base LLMs for CPU runs: a tokenizer trained on the fly and a model built from a config.

`python -m llava_drip.train.tiny --out DIR [--arch llama|qwen2|mistral] [--data finetune.json ...]` writes
an HF folder (tokenizer + config + model.safetensors) that `--model_name_or_path` accepts like the real one:
- llama:   Llama + sentencepiece BPE (tokenizer.model, legacy=False), Vicuna-style
- qwen2:   Qwen2 + byte-level BPE (Qwen2Tokenizer folder: tokenizer.json, no tokenizer.model) with
           <|endoftext|>, <|im_start|>, <|im_end|>; no BOS, eos <|im_end|>, pad <|endoftext|> (Qwen2.5-Instruct)
- mistral: Mistral (grouped KV heads) + sentencepiece BPE with legacy=True, as Mistral's LlamaTokenizer
"""
import argparse
import json
import os
from typing import Iterable, List

TINY_LLAMA = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)
# Qwen2.5's small models tie the LM head to the embeddings; Mistral groups KV heads
TINY_QWEN2 = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  use_sliding_window=False)
TINY_MISTRAL = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
                    sliding_window=None)
ARCHS = ("llama", "qwen2", "mistral")
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus_from_llava_json(paths: Iterable[str]) -> List[str]:
    from llava_drip.conversation import conv_vicuna_v1  # here: it loads torch, and `--help` need not
    lines = [conv_vicuna_v1.system, "USER: ASSISTANT:"]
    for path in paths:
        for rec in json.load(open(path)):
            for turn in rec.get("conversations", []):
                lines.extend(turn["value"].replace("<image>", "").splitlines())
    return [l for l in lines if l.strip()]


def train_tokenizer(out_dir: str, lines: List[str], vocab_size: int = 512, legacy: bool = False):
    """Byte-fallback BPE so any text (and any emoji a user types in the demo) tokenizes, with Llama's
    normalisation (digits split, whitespace kept as is: "USER: " ends in a lone "▁" as with Vicuna).

    legacy: the LlamaTokenizer flag (True: text after a special token gets its '▁', as Mistral's)."""
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
                   "model_max_length": 1024, "legacy": legacy}, f)
    tok = AutoTokenizer.from_pretrained(out_dir, add_bos_token=True, legacy=legacy)
    tok.save_pretrained(out_dir)
    return tok


def train_qwen_tokenizer(out_dir: str, lines: List[str], vocab_size: int = 512):
    """A byte-level BPE laid out as Qwen2's: Qwen's pre-tokenizer, NFC, ChatML markers as special tokens,
    saved as a Qwen2Tokenizer folder (tokenizer.json, vocab.json, merges.txt; no tokenizer.model)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    # Qwen2's own split: transformers' Qwen2Tokenizer rebuilds the same pre-tokenizer on load
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    os.makedirs(out_dir, exist_ok=True)
    bpe = Tokenizer(models.BPE())  # no unk: every byte is in the alphabet
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(lines, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=None, unk_token=None, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
                                  model_max_length=1024)
    tok.save_pretrained(out_dir)
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(tokenizer_class="Qwen2Tokenizer", errors="replace", split_special_tokens=False)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=1)
    # Qwen's folders also carry vocab.json + merges.txt, which Qwen2Tokenizer can build from alone
    bpe.model.save(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def chatml_lines() -> List[str]:
    """The qwen_2 template's fixed text, so the tiny BPE learns its pieces."""
    from llava_drip.conversation import conv_qwen
    return [conv_qwen.system.split("\n", 1)[1], "system", "user", "assistant"]


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


def build_tiny_llm(out_dir: str, lines: List[str], vocab_size: int = 512, seed: int = 0, lm_steps: int = 0,
                   arch: str = "llama"):
    """A tiny base LLM folder of one family (ARCHS); returns (tokenizer, model)."""
    import torch
    import transformers
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; use one of {ARCHS}")
    if arch == "qwen2":
        tok = train_qwen_tokenizer(out_dir, lines + chatml_lines(), vocab_size)
    else:
        tok = train_tokenizer(out_dir, lines, vocab_size, legacy=arch == "mistral")
    torch.manual_seed(seed)
    cfg_cls, model_cls, shape = {"llama": ("LlamaConfig", "LlamaForCausalLM", TINY_LLAMA),
                                 "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", TINY_QWEN2),
                                 "mistral": ("MistralConfig", "MistralForCausalLM", TINY_MISTRAL)}[arch]
    cfg = getattr(transformers, cfg_cls)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=None, **shape)
    model = getattr(transformers, model_cls)(cfg)
    if lm_steps:
        had_pad = tok.pad_token
        if had_pad is None:
            tok.pad_token = tok.unk_token
        final = pretrain_lm(model, tok, lines, lm_steps, seed)
        print(f"text pretraining: {lm_steps} steps, final loss {final:.3f}")
        tok.pad_token = had_pad
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
    p = argparse.ArgumentParser(prog="llava-drip tiny-llm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--arch", choices=ARCHS, default="llama", help="LLM family (default llama)")
    p.add_argument("--data", nargs="*", default=[], help="LLaVA JSON files whose text trains the tokenizer")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lm-steps", type=int, default=0, help="causal-LM steps on the corpus text (0: random init)")
    args = p.parse_args(argv)
    from llava_drip.conversation import conv_vicuna_v1
    lines = corpus_from_llava_json(args.data) or [conv_vicuna_v1.system]
    tok, model = build_tiny_llm(args.out, lines, args.vocab_size, args.seed, args.lm_steps, args.arch)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: vocab {len(tok)}, {n / 1e6:.2f} M parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

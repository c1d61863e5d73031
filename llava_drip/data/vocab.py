"""The word-level tokenizer of the tiny CLIP configs: every word the synthetic captions and zero-shot
prompts can contain, and nothing else (unknown words map to [UNK]).

    python -m llava_drip.data.vocab        rewrites llava_drip/drip/tokenizers/synth-words/

With ~100 tokens the text tower's embedding is ~13 k parameters instead of open_clip's 49 408 x width,
so the image tower, the part being compared, dominates a training step. The folder is a standard
`tokenizer.json` that `transformers.AutoTokenizer` (and so open_clip's HFTokenizer) loads offline.
"""
import argparse
import re
from pathlib import Path

from . import shapes

OUT = Path(__file__).resolve().parents[1] / "drip" / "tokenizers" / "synth-words"
SPECIALS = ("[PAD]", "[UNK]", "[SOS]", "[EOS]")  # ids 0-3: text_cfg pad_id 0, eos_id 3


def caption_words() -> list:
    """Sorted words of every caption template, phrase, attribute and zero-shot prompt."""
    from .synth_clip import TEMPLATES
    texts = list(shapes._CAPTIONS) + list(shapes._SHORT_CAPTIONS) + list(TEMPLATES)
    texts += [p for d in (shapes.POSITION_PHRASES, shapes.BACKGROUND_PHRASES, shapes.SIZE_WORDS) for ps in d.values() for p in ps]
    texts += list(shapes.SHAPES) + list(shapes.PLURALS.values()) + list(shapes.COLORS)
    texts += list(shapes.NUMBER_WORDS.values()) + ["a", "an", "one", "is", "are"]
    words = set()
    for t in texts:
        t = re.sub(r"\{[a-z]*\}", " ", t.lower())
        words.update(re.findall(r"\w+|[^\w\s]", t))
    return sorted(words)


def build(out: Path = OUT) -> Path:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in caption_words():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation apart
    tok.post_processor = processors.TemplateProcessing(
        single="[SOS] $A [EOS]", special_tokens=[("[SOS]", 2), ("[EOS]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[SOS]", eos_token="[EOS]")
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_drip.data.vocab", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    a = p.parse_args(argv)
    path = build(a.out)
    print(f"wrote {len(SPECIALS) + len(caption_words())}-token word tokenizer to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The tiny configs' word tokenizer covers every caption and prompt the synthetic generators write."""
import json

import pytest

from llava_drip.data import shapes, vocab
from llava_drip.clip.zeroshot import PluralTemplate
from llava_drip.data.synth_clip import TEMPLATES, class_folders
from llava_drip.drip import get_model_config, get_tokenizer


def test_shipped_tokenizer_matches_the_generator(tmp_path):
    # rebuilding from the current caption grammar gives the shipped files
    vocab.build(tmp_path)
    shipped = json.loads((vocab.OUT / "tokenizer.json").read_text())
    rebuilt = json.loads((tmp_path / "tokenizer.json").read_text())
    assert shipped["model"]["vocab"] == rebuilt["model"]["vocab"], "run python -m llava_drip.data.vocab"


@pytest.mark.parametrize("name", ["ViT-tiny", "DRIP-2x-tiny", "DRIP-4x-tiny", "DRIP-10x-tiny"])
def test_no_unknown_words_in_captions_or_prompts(name):
    cfg = get_model_config(name)["text_cfg"]
    tok = get_tokenizer(name)
    texts = [shapes.caption(shapes.sample_scene(r), r) for r in (shapes.rng_for(0, 0, i) for i in range(2000))]
    texts += [PluralTemplate(t)(f"{c} {s}") for _, c, s in class_folders() for t in TEMPLATES]
    ids = tok(texts)
    assert ids.shape == (len(texts), cfg["context_length"])
    assert int(ids.max()) < cfg["vocab_size"]
    assert not (ids == 1).any(), "[UNK] in a synthetic caption"
    # every text ends in [EOS] (the pooled token: pool_type eos) and nothing was truncated
    assert ((ids == cfg["eos_id"]).sum(1) == 1).all()
    assert (ids[:, -1] == cfg["pad_id"]).all()


def test_unknown_words_map_to_unk():
    tok = get_tokenizer("DRIP-4x-tiny")
    ids = tok(["a zebra"])[0].tolist()
    assert ids[:4] == [2, tok.tokenizer.convert_tokens_to_ids("a"), 1, 3]


def test_plural_templates(tmp_path):
    from llava_drip.clip.zeroshot import plural, read_templates
    from llava_drip.data.shapes import PLURALS
    assert all(plural(f"red {s}") == f"red {p}" for s, p in PLURALS.items())  # the synthetic nouns' own plurals
    f = tmp_path / "t.txt"
    f.write_text("one {}.\n")
    assert read_templates(f) == ["one {}."]  # plain format strings, open_clip's usual kind
    f.write_text("one {}.\ntwo {plural}.\n")
    assert [t("blue cross") for t in read_templates(f)] == ["one blue cross.", "two blue crosses."]
    f.write_text("one {} and two {plural}.\n")
    with pytest.raises(ValueError, match=r"template 1 .* exactly one \{\}"):
        read_templates(f)

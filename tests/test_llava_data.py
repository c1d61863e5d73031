"""Training data: input_ids and labels are LLaVA's (haotian-liu/LLaVA llava/train/train.py @c121f04).

Hand-checked examples with a tiny Llama-style SentencePiece tokenizer (byte fallback, split digits),
then an independent re-implementation of LLaVA's preprocessing (`llava_reference`, written from LLaVA's
documented rules, on tensors as LLaVA does it) compared on generated and on real ScienceQA records.
"""
import copy
import json
import os
import random

import pytest
import torch
from PIL import Image

from llava_drip.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_drip.conversation import SeparatorStyle, conv_templates, get_conv_template
from llava_drip.mm_utils import tokenizer_image_token
from llava_drip.train.data import (BadSample, BadSampleLog, DataCollatorForSupervisedDataset, LazySupervisedDataset,
                                   build_prompt, preprocess, tokenizer_is_legacy)

SYS = ("A chat between a curious user and an artificial intelligence assistant. "
       "The assistant gives helpful, detailed, and polite answers to the user's questions.")
CORPUS = [
    "the cat sat on the mat and looked at the red ball",
    "a small dog runs in the park with a green ball",
    "what color is the shape in the picture",
    "there are three circles and two squares on the left",
    "the answer is the blue triangle near the top",
    "describe the image in detail please",
    "which animal is larger, the horse or the mouse",
    "it costs 5 dollars and 20 cents at the shop",
    "count the apples: 1, 2, 3, 4 and 10 more",
    "select the best option from the choices below",
    "the weather today is sunny with a light wind",
    "people can use the design process to solve problems",
] * 4 + [SYS, SYS.replace("user", "human")] * 2


def train_tokenizer(folder, lines, legacy=False, model_max_length=1024):
    """Llama-style: BPE, byte fallback, digits split; loaded as transformers' LlamaTokenizer with BOS."""
    import sentencepiece as spm
    from transformers import AutoTokenizer
    os.makedirs(folder, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=os.path.join(folder, "tokenizer"), vocab_size=512,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2, num_threads=1)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                   "model_max_length": model_max_length, "legacy": legacy}, f)
    tok = AutoTokenizer.from_pretrained(folder, add_bos_token=True, legacy=legacy)
    tok.pad_token = tok.unk_token  # as LLaVA's train() does for v1
    return tok


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(str(tmp_path_factory.mktemp("tok")), CORPUS)


@pytest.fixture(scope="module")
def tok_legacy(tmp_path_factory):
    return train_tokenizer(str(tmp_path_factory.mktemp("tok_legacy")), CORPUS, legacy=True)


def _rec(*turns, image=None, rid="r"):
    rec = {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns]}
    if image is not None:
        rec["image"] = image
    return rec


def pieces(tok, ids):
    return ["<image>" if i == IMAGE_TOKEN_INDEX else tok.convert_ids_to_tokens(int(i)) for i in ids]


def supervised(tok, ids, labels):
    """Supervised pieces, one list per contiguous run."""
    runs, cur = [], []
    for p, lab in zip(pieces(tok, ids), labels.tolist()):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(p)
    return runs + ([cur] if cur else [])


# ---- hand-checked examples --------------------------------------------------------------------------------
ASSISTANT = ["▁A", "<0x53>", "<0x53>", "<0x49>", "<0x53>", "T", "A", "<0x4E>", "T", ":"]  # " ASSISTANT:"
USER = ["<0x55>", "<0x53>", "<0x45>", "<0x52>", ":"]


@pytest.mark.parametrize("answer, expected", [
    ("2", ["▁", "2", "</s>"]),  # the lone "▁" before a digit is supervised, as in LLaVA
    ("10", ["▁", "1", "0", "</s>"]),
    ("(B)", ["▁", "<0x28>", "<0x42>", "<0x29>", "</s>"]),
    ("$5", ["▁", "<0x24>", "5", "</s>"]),
    ("🙂", ["▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>", "</s>"]),
    ("the red ball", ["▁the", "▁red", "▁ball", "</s>"]),
])
def test_first_answer_token_and_lone_space_are_supervised(tok, answer, expected):
    ids, labels = preprocess(_rec(("human", "what color?"), ("gpt", answer))["conversations"],
                             get_conv_template("vicuna_v1"), tok, has_image=False)
    p = pieces(tok, ids)
    assert p[-len(expected) - len(ASSISTANT):-len(expected)] == ASSISTANT
    assert supervised(tok, ids, labels) == [expected]  # so " ASSISTANT:" and all before it are masked
    assert p[0] == "<s>" and labels[0] == IGNORE_INDEX


def test_multi_turn_rounds(tok):
    conv = get_conv_template("vicuna_v1")
    turns = [("human", "what color?"), ("gpt", "red"), ("human", "and 2+2?"), ("gpt", "4")]
    prompt = build_prompt(_rec(*turns)["conversations"], conv, False)
    assert prompt == f"{SYS} USER: what color? ASSISTANT: red</s>USER: and 2+2? ASSISTANT: 4</s>"
    ids, labels = preprocess(_rec(*turns)["conversations"], conv, tok, False)
    assert supervised(tok, ids, labels) == [["▁red", "</s>"], ["▁", "4", "</s>"]]
    p = pieces(tok, ids)
    # legacy=False: no "▁" after "</s>", and LLaVA's -1 for later rounds accounts for exactly that
    k = p.index("</s>")
    assert p[k + 1:k + 1 + len(USER)] == USER and labels[k + 1] == IGNORE_INDEX


def test_legacy_flag(tok, tok_legacy):
    assert (tok.legacy, tokenizer_is_legacy(tok)) == (False, False)
    assert (tok_legacy.legacy, tokenizer_is_legacy(tok_legacy)) == (True, True)
    conv = get_conv_template("vicuna_v1")
    turns = _rec(("human", "what color?"), ("gpt", "red"), ("human", "and 2+2?"), ("gpt", "4"))["conversations"]
    ids, labels = preprocess(turns, conv, tok_legacy, False)
    p = pieces(tok_legacy, ids)
    k = p.index("</s>")
    assert p[k + 1:k + 2 + len(USER)] == ["▁"] + USER  # legacy: "USER" after "</s>" gets "▁", no correction
    assert supervised(tok_legacy, ids, labels) == [["▁red", "</s>"], ["▁", "4", "</s>"]]


def test_a_vocabulary_that_breaks_llava_arithmetic_gives_a_counted_bad_sample(tmp_path):
    # with "▁USER" a single piece, "USER" right after "</s>" (no "▁", legacy=False) is two pieces, so
    # LLaVA's per-round counts are off by 2: LLaVA masks the sample, here it is a bad sample
    merged = train_tokenizer(str(tmp_path / "merged"), CORPUS + ["USER: ASSISTANT: USER"] * 40)
    assert merged.tokenize("USER:")[0] == "▁USER" and merged.tokenize("</s>USER:")[1:3] == ["US", "ER"]
    conv = get_conv_template("vicuna_v1")
    one = _rec(("human", "what color?"), ("gpt", "red"))["conversations"]
    assert supervised(merged, *preprocess(one, conv, merged, False)) == [["▁red", "</s>"]]
    two = one + [{"from": "human", "value": "and?"}, {"from": "gpt", "value": "blue"}]
    with pytest.raises(BadSample, match="tokenization mismatch: LLaVA's round arithmetic counts 70 tokens, "
                                        "the tokenizer gives 72"):
        preprocess(two, conv, merged, False)
    assert llava_reference(_rec(*[(t["from"], t["value"]) for t in two]), "vicuna_v1", merged, 1024)[2] == "mismatch"


def test_image_token_moves_to_the_front_of_its_turn(tok):
    conv = get_conv_template("vicuna_v1")
    rec = _rec(("human", "what color?"), ("gpt", "red"), ("human", "look at <image> here"), ("gpt", "2"),
               image="x.png")
    prompt = build_prompt(rec["conversations"], conv, True)
    assert prompt == f"{SYS} USER: what color? ASSISTANT: red</s>USER: <image>\nlook at  here ASSISTANT: 2</s>"
    ids, labels = preprocess(rec["conversations"], conv, tok, True)
    assert ids.tolist().count(IMAGE_TOKEN_INDEX) == 1
    assert labels[ids.tolist().index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX
    assert supervised(tok, ids, labels) == [["▁red", "</s>"], ["▁", "2", "</s>"]]
    # several in one turn collapse to one; a gpt turn is moved too
    many = _rec(("human", "<image>\n<image>\nwhat?"), ("gpt", "red <image>"), image="x.png")["conversations"]
    with pytest.raises(BadSample, match="record has an image but 2 '<image>' tokens in its prompt"):
        build_prompt(many, conv, True)
    one = _rec(("human", "<image>\n<image>\nwhat?"), ("gpt", "red"), image="x.png")["conversations"]
    assert build_prompt(one, conv, True) == f"{SYS} USER: <image>\nwhat? ASSISTANT: red</s>"
    assert build_prompt(_rec(("human", "<image>"), ("gpt", "red"))["conversations"], conv, True) == \
        f"{SYS} USER: <image> ASSISTANT: red</s>"  # LLaVA strips the "\n" when nothing follows
    mmtag = build_prompt(one, get_conv_template("v1_mmtag"), True)
    assert mmtag.endswith(" USER: <Image><image></Image>\nwhat? ASSISTANT: red</s>")
    start_end = build_prompt(one, conv, True, mm_use_im_start_end=True)
    assert start_end.endswith(" USER: <im_start><image><im_end>\nwhat? ASSISTANT: red</s>")
    with pytest.raises(BadSample, match="record has an image but 0 '<image>' tokens"):
        build_prompt(_rec(("human", "what?"), ("gpt", "red"))["conversations"], conv, True)
    with pytest.raises(BadSample, match="record has no image but 1 '<image>' tokens"):
        build_prompt(_rec(("human", "<image>\nwhat?"), ("gpt", "red"))["conversations"], conv, False)


def test_leading_gpt_turn_is_dropped(tok):
    conv = get_conv_template("vicuna_v1")
    turns = _rec(("gpt", "hello there"), ("human", "what color?"), ("gpt", "red"))["conversations"]
    assert build_prompt(turns, conv, False) == f"{SYS} USER: what color? ASSISTANT: red</s>"
    assert supervised(tok, *preprocess(turns, conv, tok, False)) == [["▁red", "</s>"]]
    with pytest.raises(BadSample, match="turn 1: expected from='human', got 'gpt'"):
        build_prompt(turns[:1] + turns[:1] + turns[2:], conv, False)
    with pytest.raises(BadSample, match="plain template .* got 3 turns"):
        build_prompt(turns, get_conv_template("plain"), True)


def test_trailing_human_turn_is_a_bad_sample_as_llava_masks_it(tok):
    rec = _rec(("human", "what color?"), ("gpt", "red"), ("human", "and now?"))
    with pytest.raises(BadSample, match="ends with a human turn"):
        preprocess(rec["conversations"], get_conv_template("vicuna_v1"), tok, False)
    ids, labels, status, _ = llava_reference(rec, "vicuna_v1", tok, 1024)
    assert status == "mismatch" and (labels == IGNORE_INDEX).all()  # LLaVA: "tokenization mismatch" warning


def test_truncation(tok):
    conv = get_conv_template("vicuna_v1")
    turns = _rec(("human", "the cat sat " * 30), ("gpt", "the red ball"))["conversations"]
    full, _ = preprocess(turns, conv, tok, False)
    n = len(full)
    ids, labels = preprocess(turns, conv, tok, False, model_max_length=n - 2)  # text-only: cut here
    assert ids.tolist() == full[:n - 2].tolist() and supervised(tok, ids, labels) == [["▁the", "▁red"]]
    with pytest.raises(BadSample, match=f"no answer token left after truncation to {n - 5} tokens"):
        preprocess(turns, conv, tok, False, model_max_length=n - 5)
    # image records are not cut here (LLaVA's collator does it), but a sample left without answer is bad
    img = [{"from": "human", "value": "<image>\n" + turns[0]["value"]}, turns[1]]
    m = len(preprocess(img, conv, tok, True)[0])
    ids, labels = preprocess(img, conv, tok, True, model_max_length=m - 2)
    assert len(ids) == m and supervised(tok, ids, labels) == [["▁the", "▁red", "▁ball", "</s>"]]
    with pytest.raises(BadSample, match=f"no answer token left after truncation to {m - 5} tokens"):
        preprocess(img, conv, tok, True, model_max_length=m - 5)


def test_plain_stage1_record(tok):
    conv = get_conv_template("plain")
    rec = _rec(("human", "describe <image> please"), ("gpt", "the red ball"), image="x.png")
    assert build_prompt(rec["conversations"], conv, True) == "<image>the red ball\n"
    ids, labels = preprocess(rec["conversations"], conv, tok, True)
    assert pieces(tok, ids) == ["<s>", "<image>", "▁the", "▁red", "▁ball", "<0x0A>"]
    assert labels.tolist()[:2] == [IGNORE_INDEX] * 2 and labels.tolist()[2:] == ids.tolist()[2:]
    with pytest.raises(BadSample, match="needs an image record"):
        build_prompt(_rec(("human", "hi"), ("gpt", "the red ball"))["conversations"], conv, False)


def test_llava_mismatch_is_a_counted_bad_sample(tok, tmp_path):
    # "</s>" inside a question splits LLaVA's rounds early: LLaVA masks the sample and prints a warning
    bad = _rec(("human", "say </s> now"), ("gpt", "ok"), rid="split-round")
    with pytest.raises(BadSample, match="tokenization mismatch"):
        preprocess(bad["conversations"], get_conv_template("vicuna_v1"), tok, False)
    assert llava_reference(bad, "vicuna_v1", tok, 1024)[2] == "mismatch"
    good = _rec(("human", "what color?"), ("gpt", "red"), rid="good")
    data = tmp_path / "d.json"
    data.write_text(json.dumps([bad, good]))
    log = BadSampleLog(str(tmp_path / "bad"))
    ds = LazySupervisedDataset(str(data), tok, get_conv_template("vicuna_v1"), None, model_max_length=200,
                               bad_log=log)
    assert len(ds) == 2  # cheap checks pass; the tokenization is checked lazily
    item = ds[0]
    assert item["id"] == "good"  # the bad record is replaced by the next one
    assert BadSampleLog.collect(str(tmp_path / "bad")) == {
        "split-round": log.seen["split-round"]} and "tokenization mismatch" in log.seen["split-round"]


class StubProcessor:
    image_mean = (0.5, 0.5, 0.5)
    crop_size = {"height": 8, "width": 8}

    def preprocess(self, img, return_tensors="pt"):
        return {"pixel_values": torch.full((1, 3, 8, 8), float(img.size[0] * 100 + img.size[1]))}


def test_dataset_checks_and_collator(tok, tmp_path):
    Image.new("RGB", (12, 6)).save(tmp_path / "a.png")
    recs = [
        _rec(("human", "<image>\nwhat color is the shape in the picture on the left?"), ("gpt", "red"), image="a.png",
             rid="img"),
        _rec(("human", "what color? " * 12), ("gpt", "the red ball"), rid="long-text"),
        _rec(("human", "2+2?"), ("gpt", "4"), rid="text"),
        {"id": "no-conv"},
        {"id": "bad-value", "conversations": [{"from": "human", "value": ["x"]}, {"from": "gpt", "value": "y"}]},
        {"id": "bad-from", "conversations": [{"from": "user", "value": "x"}, {"from": "gpt", "value": "y"}]},
        _rec(("human", "<image>\nhi"), ("gpt", "x"), image="missing.png", rid="missing"),
        _rec(rid="empty"),
    ]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    long_len = len(preprocess(recs[1]["conversations"], get_conv_template("v1"), tok, False)[0])
    log = BadSampleLog(None)
    ds = LazySupervisedDataset(str(tmp_path / "d.json"), tok, get_conv_template("v1"), str(tmp_path),
                               image_processor=StubProcessor(), image_aspect_ratio="pad",
                               model_max_length=long_len - 1, bad_log=log)
    assert [r["id"] for r in ds.records] == ["img", "long-text", "text"]
    assert log.seen == {
        "no-conv": "record has no 'conversations' list",
        "bad-value": "turn 0: expected from='human' or 'gpt' with a string 'value', got from='human', "
                     "value of type list",
        "bad-from": "turn 0: expected from='human' or 'gpt' with a string 'value', got from='user', value of type str",
        "missing": f"image file missing: {tmp_path / 'missing.png'}",
        "empty": "empty 'conversations'"}
    assert ds.modality_lengths == [13, -27, -2] and ds.lengths == [141, 27, 2]
    items = [ds[i] for i in range(3)]
    assert items[0]["image"].shape == (3, 8, 8) and float(items[0]["image"][0, 0, 0]) == 1212  # 12x6 padded
    assert len(items[1]["input_ids"]) == long_len - 1  # text-only: truncated to model_max_length here
    assert supervised(tok, items[1]["input_ids"], items[1]["labels"]) == [["▁the", "▁red", "▁ball"]]
    n_text = len(items[2]["input_ids"])
    cut = n_text + 5
    assert len(items[0]["input_ids"]) > cut and len(items[1]["input_ids"]) > cut
    tok.model_max_length = cut  # the collator cuts to the tokenizer's limit, as LLaVA's does
    try:
        batch = DataCollatorForSupervisedDataset(tok, (3, 8, 8))(items)
    finally:
        tok.model_max_length = 1024
    assert batch["input_ids"].shape == (3, cut) and batch["labels"].shape == (3, cut)
    assert batch["input_ids"][0].tolist() == items[0]["input_ids"][:cut].tolist()
    assert batch["labels"][1].tolist() == items[1]["labels"][:cut].tolist()
    assert batch["attention_mask"][2].tolist() == [True] * n_text + [False] * 5
    assert (batch["input_ids"][2, n_text:] == tok.pad_token_id).all()
    assert (batch["labels"][2, n_text:] == IGNORE_INDEX).all()
    assert batch["images"].shape == (3, 3, 8, 8) and not batch["images"][2].any()


# ---- an independent reference: LLaVA's preprocessing as documented, on tensors -------------------------------
def ref_tokenizer_image_token(prompt, tok):
    chunks = [tok(c).input_ids for c in prompt.split("<image>")]
    bos = 1 if chunks[0] and chunks[0][0] == tok.bos_token_id else 0
    out = [tok.bos_token_id] if bos else []
    for k, c in enumerate(chunks):
        out += ([IMAGE_TOKEN_INDEX] if k else []) + c[bos:]
    return out


def llava_reference(rec, name, tok, max_len):
    """LLaVA's preprocess for one record -> (input_ids, labels, status, counted tokens).

    status: "ok"; "mismatch" (LLaVA masks the sample and warns); "unchecked mismatch": the counts disagree
    with the untruncated tokenization but LLaVA skips its check (sample >= model_max_length).
    """
    conv = conv_templates[name]
    has_image = "image" in rec
    source = copy.deepcopy(rec["conversations"])
    n_tok_all = (lambda s: ref_tokenizer_image_token(s, tok)) if has_image else (lambda s: tok(s).input_ids)
    n_tok = lambda s: len(n_tok_all(s))
    if has_image:  # preprocess_multimodal
        for s in source:
            if "<image>" in s["value"]:
                s["value"] = ("<image>\n" + s["value"].replace("<image>", "").strip()).strip()
                if "mmtag" in conv.version:
                    s["value"] = s["value"].replace("<image>", "<Image><image></Image>")
    if conv.sep_style == SeparatorStyle.PLAIN:
        assert len(source) == 2 and "<image>" in source[0]["value"]
        ids = torch.tensor(ref_tokenizer_image_token("<image>" + source[1]["value"] + conv.sep, tok))
        labels = ids.clone()
        labels[:len(ref_tokenizer_image_token("<image>", tok))] = IGNORE_INDEX
        return ids, labels, "ok", None
    roles = {"human": conv.roles[0], "gpt": conv.roles[1]}
    family = ("llama_2" if conv.sep_style == SeparatorStyle.LLAMA_2 else "v1" if conv.version.startswith("v1")
              else "mpt" if conv.version == "mpt" else "v0")
    if family == "v0":
        return _reference_v0(source, conv, tok, has_image, max_len)
    if roles[source[0]["from"]] != conv.roles[0]:
        source = source[1:]
    c = conv.copy()
    c.messages = []
    for j, s in enumerate(source):
        assert roles[s["from"]] == c.roles[j % 2]
        c.append_message(roles[s["from"]], s["value"])
    prompt = c.get_prompt()
    if has_image:
        ids = torch.tensor(ref_tokenizer_image_token(prompt, tok))
    else:
        ids = tok([prompt], return_tensors="pt", padding="longest", max_length=max_len, truncation=True).input_ids[0]
    labels = ids.clone()
    total = int(labels.ne(tok.pad_token_id).sum())
    full_total = len(n_tok_all(prompt))
    legacy = getattr(tok, "legacy", False)  # LLaVA reads the attribute
    if family == "mpt":
        sep, cur, trim, fix = conv.sep + conv.roles[1], 0, 1, (1 if legacy else 0)
        r = prompt.split(conv.sep)
        rounds = [conv.sep.join(r[:3])] + [conv.sep.join(r[k:k + 2]) for k in range(3, len(r), 2)]
    else:
        sep = "[/INST] " if family == "llama_2" else conv.sep + conv.roles[1] + ": "
        cur, trim, fix = 1, 2, (-1 if family == "v1" and not legacy else 0)
        rounds = prompt.split(conv.sep2)
    labels[:cur] = IGNORE_INDEX
    for i, rou in enumerate(rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        round_len, instruction_len = n_tok(rou), n_tok(parts[0] + sep) - trim
        if i != 0:
            round_len, instruction_len = round_len + fix, instruction_len + fix
        labels[cur:cur + instruction_len] = IGNORE_INDEX
        cur += round_len
    labels[cur:] = IGNORE_INDEX
    if cur < max_len and cur != total:
        labels[:] = IGNORE_INDEX
        return ids, labels, "mismatch", cur
    return ids, labels, "ok" if cur == full_total else "unchecked mismatch", cur


def _reference_v0(source, conv, tok, has_image, max_len):
    header = f"{conv.system}\n\n"
    values = []
    for s in source:  # _add_speaker_and_signal
        role = conv.roles[0] if s["from"] == "human" else conv.roles[1]
        values.append("### " + role + ": " + s["value"] + "\n")
    prompt = header + "".join(values) + "### "
    if has_image:
        ids = torch.tensor(ref_tokenizer_image_token(prompt, tok))
        lens = [len(ref_tokenizer_image_token(t, tok)) for t in [header] + values]
    else:
        ids = tok(prompt, return_tensors="pt", max_length=max_len, truncation=True).input_ids[0]
        lens = [len(tok(t, max_length=max_len, truncation=True).input_ids) for t in [header] + values]
    labels = ids.clone()
    cur = lens[0]
    labels[:cur] = IGNORE_INDEX  # _mask_targets
    for n, s in zip(lens[1:], source):
        if s["from"] == "human":
            labels[cur + 2:cur + n] = IGNORE_INDEX
        cur += n
    return ids, labels, "ok", None


def compare(rec, name, tok, max_len):
    """Ours vs the reference on one record; returns the outcome class, asserts they agree."""
    ref_ids, ref_labels, status, _ = llava_reference(rec, name, tok, max_len)
    has_image = "image" in rec
    try:
        ids, labels = preprocess(rec["conversations"], get_conv_template(name), tok, has_image,
                                 model_max_length=max_len)
    except BadSample as e:
        reason = str(e)
        if has_image and ref_ids.tolist().count(IMAGE_TOKEN_INDEX) != 1:  # LLaVA's model would fail on it
            assert "'<image>' tokens" in reason
            return "bad: image tokens"
        if "empty gpt answer" in reason:  # LLaVA trains on the separator alone; refused here
            assert any(t["from"] == "gpt" and not t["value"].strip() for t in rec["conversations"])
            return "bad: empty answer"
        if status == "mismatch":
            return "bad: llava masks it"
        if status == "unchecked mismatch":
            assert "tokenization mismatch" in reason
            return "bad: llava skips its check"  # long sample with shifted labels (stricter here)
        assert (ref_labels[:max_len] == IGNORE_INDEX).all() and "no answer token" in reason, (reason, rec)
        return "bad: nothing to learn"
    assert status == "ok", rec
    assert ids.tolist() == ref_ids.tolist(), rec
    assert labels.tolist() == ref_labels.tolist(), rec
    return "same"


WORDS = "the cat sat on mat red ball what color is shape three circles Horse 4 \n".split(" ")
ANSWERS = ["2", "10", "3.5", "(B)", "B", "$5", "🙂 yes", "the red ball", "A1", "  two spaces", "Red.\nGreen.", "-1",
           "ASSISTANT: echo", "x</s>y", "<image> in an answer"]


def random_record(rng, name, i):
    plain = conv_templates[name].sep_style == SeparatorStyle.PLAIN
    has_image = plain or rng.random() < 0.5
    words = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
    n_rounds = 1 if plain else rng.randint(1, 4)
    turns = []
    if not plain and rng.random() < 0.1 and not name.startswith(("llava_v0", "v0")):
        turns.append(("gpt", words()))  # LLaVA drops a leading gpt turn
    for _ in range(n_rounds):
        turns += [("human", words()), ("gpt", rng.choice(ANSWERS + [words()] * 4))]
    if has_image:
        j = 0 if rng.random() < 0.7 else 2 * rng.randrange(n_rounds)
        j += turns[0][0] == "gpt"
        v = turns[j][1].split(" ")
        v.insert(rng.randint(0, len(v)), "<image>")
        turns[j] = (turns[j][0], " ".join(v))
    turns = [(f, v if has_image else v.replace("<image>", "image")) for f, v in turns]
    return _rec(*turns, image="x.png" if has_image else None, rid=str(i))


TEMPLATES = ["vicuna_v1", "llava_v1", "v1_mmtag", "llama_2", "llava_llama_2", "mistral_instruct", "mpt",
             "chatml_direct", "plain", "llava_v0", "v0_mmtag"]


@pytest.fixture(scope="module")
def tok_chatml(tmp_path_factory):
    """Per legacy flag, a tokenizer that knows ChatML's markers as special tokens (as chatml_direct models do)."""
    out = {}
    for legacy in (False, True):
        out[legacy] = train_tokenizer(str(tmp_path_factory.mktemp(f"chatml{legacy}")), CORPUS, legacy=legacy)
        out[legacy].add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return out


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("name", TEMPLATES)
def test_matches_llava_reference_on_generated_records(name, legacy, tok, tok_legacy, tok_chatml):
    t = tok_chatml[legacy] if conv_templates[name].version == "mpt" else tok_legacy if legacy else tok
    rng = random.Random(f"{name}-{legacy}")
    outcomes = {}
    for i in range(120):
        out = compare(random_record(rng, name, i), name, t, max_len=rng.choice([1024, 1024, rng.randint(40, 160)]))
        outcomes[out] = outcomes.get(out, 0) + 1
    if name in ("vicuna_v1", "llava_v1", "v1_mmtag", "llama_2", "llava_llama_2", "plain", "llava_v0", "v0_mmtag"):
        assert outcomes.get("same", 0) >= 60, outcomes
    # LLaVA's mpt counts (no BOS expected) and mistral's (sep "") fit this tokenizer only for some settings:
    # elsewhere LLaVA masks the samples and they are bad samples here, which the comparison checks
    if (name, legacy) in (("mpt", True), ("chatml_direct", True), ("mistral_instruct", True)):
        assert outcomes.get("same", 0) >= 15, outcomes


def test_scienceqa_records_match_llava_reference(shared_data, tmp_path):
    records = json.load(open(shared_data / "scienceqa" / "llava_eval" / "llava_test_CQM-A.json"))[:300]
    lines = [line for r in records for t in r["conversations"] for line in t["value"].replace("<image>", "").split("\n")
             if line.strip()]
    sqa_tok = train_tokenizer(str(tmp_path / "sqa"), lines)
    # also two real records joined into one two-round conversation
    pairs = [{"id": f"{a['id']}+{b['id']}", **({"image": a["image"]} if "image" in a else {}),
              "conversations": a["conversations"] + [
                  {"from": t["from"], "value": t["value"].replace("<image>", "").strip()} for t in b["conversations"]]}
             for a, b in zip(records[0::2], records[1::2])]
    outcomes = {}
    for rec in records + pairs:
        for name in ("vicuna_v1", "llava_v1"):
            out = compare(rec, name, sqa_tok, max_len=2048)
            outcomes[out] = outcomes.get(out, 0) + 1
    assert outcomes == {"same": 2 * (len(records) + len(pairs))}, outcomes
    ids, labels = preprocess(records[1]["conversations"], get_conv_template("vicuna_v1"), sqa_tok, True)
    assert ids.tolist().count(IMAGE_TOKEN_INDEX) == 1
    assert "".join(p for run in supervised(sqa_tok, ids, labels) for p in run).replace("▁", " ") == \
        " " + records[1]["conversations"][1]["value"] + "</s>"


def test_tokenizer_image_token_follows_llava(tok):
    ids = tokenizer_image_token("a<image>b<image>", tok)
    assert pieces(tok, ids) == ["<s>", "▁a", "<image>", "▁b", "<image>"]  # each chunk gets its own "▁"
    assert ids == ref_tokenizer_image_token("a<image>b<image>", tok)
    assert tokenizer_image_token("<image>", tok, return_tensors="pt").tolist() == [tok.bos_token_id, IMAGE_TOKEN_INDEX]
    with pytest.raises(ValueError, match="unsupported return_tensors 'np'"):
        tokenizer_image_token("a", tok, return_tensors="np")


def test_record_problems_are_caught_up_front_by_id(tok, tmp_path):
    """Every malformed record is refused when the dataset is built, by id (or raised with strict); a record cut
    to model_max_length trains but is counted."""
    Image.new("RGB", (12, 6)).save(tmp_path / "a.png")
    ask = {"from": "human", "value": "<image>\nwhat?"}
    recs = [
        _rec(("human", "<image>\nwhat?"), ("gpt", "red"), image="a.png", rid="ok"),
        {"id": "image-in-gpt", "image": "a.png", "conversations": [ask, {"from": "gpt", "value": "a <image> here"}]},
        {"id": "image-in-later-human", "image": "a.png", "conversations": [
            ask, {"from": "gpt", "value": "red"}, {"from": "human", "value": "and <image>?"},
            {"from": "gpt", "value": "blue"}]},
        {"id": "value-null", "image": "a.png", "conversations": [{"from": "human", "value": None},
                                                                 {"from": "gpt", "value": "x"}]},
        {"id": "turn-is-string", "image": "a.png", "conversations": ["<image> hi", {"from": "gpt", "value": "x"}]},
        {"id": "image-null", "image": None, "conversations": [ask, {"from": "gpt", "value": "x"}]},
        {"id": "image-list", "image": ["a.png"], "conversations": [ask, {"from": "gpt", "value": "x"}]},
        {"id": "image-int", "image": 3, "conversations": [ask, {"from": "gpt", "value": "x"}]},
        {"id": "empty-answer", "image": "a.png", "conversations": [ask, {"from": "gpt", "value": "  "}]},
        {"id": "long-later-answer", "image": "a.png", "conversations": [
            ask, {"from": "gpt", "value": "red"}, {"from": "human", "value": "more?"},
            {"from": "gpt", "value": "word " * 120}]},
    ]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    log = BadSampleLog(str(tmp_path / "bad"))
    ds = LazySupervisedDataset(str(tmp_path / "d.json"), tok, get_conv_template("v1"), str(tmp_path),
                               image_processor=StubProcessor(), model_max_length=90, bad_log=log)
    assert [r["id"] for r in ds.records] == ["ok", "long-later-answer"]
    reasons = log.seen
    assert set(reasons) == {r["id"] for r in recs} - {"ok", "long-later-answer"}
    assert "2 '<image>' tokens" in reasons["image-in-gpt"] and "2 '<image>' tokens" in reasons["image-in-later-human"]
    assert "turn 0" in reasons["value-null"] and "NoneType" in reasons["value-null"]
    assert "turn 0" in reasons["turn-is-string"]
    for k in ("image-null", "image-list", "image-int"):
        assert "'image' must be one file name" in reasons[k]
    assert "empty gpt answer" in reasons["empty-answer"]
    assert log.truncated == {}
    ds[1]  # the long record trains, cut to 90 tokens (the system prompt is ~40), and is counted
    assert list(log.truncated) == ["long-later-answer"] and "model_max_length 90" in log.truncated["long-later-answer"]
    assert BadSampleLog.collect(str(tmp_path / "bad"), prefix="truncated-") == log.truncated
    with pytest.raises(ValueError, match="image-in-gpt"):
        LazySupervisedDataset(str(tmp_path / "d.json"), tok, get_conv_template("v1"), str(tmp_path),
                              image_processor=StubProcessor(), model_max_length=90, bad_log=BadSampleLog(None, strict=True))

"""LLaVA's JSON data for stage 1/2: LLaVA's prompts and labels, the dataset, the collator, bad samples.

Behaves as haotian-liu/LLaVA's llava/train/train.py (preprocess_multimodal, the preprocess_* functions,
LazySupervisedDataset, DataCollatorForSupervisedDataset), written anew: input_ids and labels
are LLaVA's token for token, including its length arithmetic: each round is tokenized alone and the
instruction part is masked by count, so e.g. the lone "▁" piece that "ASSISTANT: 2" leaves before a
digit is supervised, as in LLaVA. One rule per template family (`RoundRule`) replaces LLaVA's copies.
Qwen's ChatML (LLaVA-NeXT's `qwen_2`) is masked per role instead (`_role_labels`), as LLaVA-NeXT does.

Where LLaVA would mask a whole sample (its arithmetic disagrees with the tokenizer: "tokenization
mismatch") or nothing is left to learn, the record is a counted bad sample (`BadSampleLog`) instead.
"""
import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, Sampler

from llava_drip.image_io import ImageError, open_image
from llava_drip.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
from llava_drip.conversation import Conversation, SeparatorStyle
from llava_drip.mm_utils import expand2square, tokenizer_image_token, tokenizer_is_legacy

logger = logging.getLogger(__name__)

ROLE_KEYS = ("human", "gpt")


class BadSample(Exception):
    """A record that cannot be trained on; the reason names the field or file."""


# ---- record -> turns -> prompt --------------------------------------------------------------------------
def _image_turn(value: str, conv: Conversation, mm_use_im_start_end: bool) -> str:
    """LLaVA's preprocess_multimodal for one turn of an image record: '<image>' moves to the front."""
    if DEFAULT_IMAGE_TOKEN in value:
        value = (DEFAULT_IMAGE_TOKEN + "\n" + value.replace(DEFAULT_IMAGE_TOKEN, "").strip()).strip()
        if "mmtag" in conv.version:
            value = value.replace(DEFAULT_IMAGE_TOKEN, "<Image>" + DEFAULT_IMAGE_TOKEN + "</Image>")
    if mm_use_im_start_end:
        value = value.replace(DEFAULT_IMAGE_TOKEN, DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN)
    return value


def prepare_turns(conversations: List[dict], conv: Conversation, has_image: bool,
                  mm_use_im_start_end: bool = False) -> List[Tuple[str, str]]:
    """Check a record's turns and apply LLaVA's rules to them.

    Every turn that holds '<image>' gets exactly one, at its front (image records only). Templates
    with round arithmetic (v1, llama_2, mpt) or per-role labels (qwen) drop a leading gpt turn as
    LLaVA and LLaVA-NeXT do; the plain template takes exactly [human, gpt].

    Returns:
        [(from, value)], alternating "human" / "gpt" from a human turn and ending with a gpt turn.
    """
    if not isinstance(conversations, list) or not conversations:
        raise BadSample("empty 'conversations'")
    turns = []
    for j, turn in enumerate(conversations):
        frm = turn.get("from") if isinstance(turn, dict) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        if frm not in ROLE_KEYS or not isinstance(value, str):
            raise BadSample(f"turn {j}: expected from='human' or 'gpt' with a string 'value', "
                            f"got from={frm!r}, value of type {type(value).__name__}")
        turns.append((frm, value))
    if not has_image:
        n_img = sum(v.count(DEFAULT_IMAGE_TOKEN) for _, v in turns)
        if n_img:
            raise BadSample(f"record has no image but {n_img} '<image>' tokens")
    else:
        turns = [(f, _image_turn(v, conv, mm_use_im_start_end)) for f, v in turns]
    if conv.sep_style == SeparatorStyle.PLAIN:
        if len(turns) != 2:
            raise BadSample(f"the plain template (stage 1) takes one human and one gpt turn, got {len(turns)} turns")
        if not has_image or DEFAULT_IMAGE_TOKEN not in turns[0][1]:
            raise BadSample("the plain template (stage 1) needs an image record with '<image>' in its first turn")
    elif _renders_turns(conv) and turns[0][0] == "gpt":
        turns = turns[1:]
    skipped = len(conversations) - len(turns)
    for j, (frm, _) in enumerate(turns):
        if frm != ROLE_KEYS[j % 2]:
            raise BadSample(f"turn {j + skipped}: expected from={ROLE_KEYS[j % 2]!r}, got {frm!r}")
    if not turns or turns[-1][0] == "human":
        raise BadSample("conversation ends with a human turn (no answer to learn)")
    for j, (frm, value) in enumerate(turns):
        if frm == "gpt" and not value.strip():
            raise BadSample(f"turn {j + skipped}: empty gpt answer (it would train on the separator alone)")
    return turns


def _v0_sentences(turns: List[Tuple[str, str]], conv: Conversation) -> List[str]:
    """LLaVA's fallback (v0) format: a header, then '### Role: value\\n' per turn."""
    return [f"{conv.system}\n\n"] + [f"### {conv.roles[ROLE_KEYS.index(f)]}: {v}\n" for f, v in turns]


def _render(turns: List[Tuple[str, str]], conv: Conversation) -> str:
    if conv.sep_style == SeparatorStyle.PLAIN:  # the caption alone follows the image
        return DEFAULT_IMAGE_TOKEN + turns[1][1] + conv.sep
    if not _renders_turns(conv):
        return "".join(_v0_sentences(turns, conv)) + "### "
    c = conv.copy()
    c.messages = []
    for j, (_, value) in enumerate(turns):
        c.append_message(c.roles[j % 2], value)
    return c.get_prompt()


def _checked_prompt(turns: List[Tuple[str, str]], conv: Conversation, has_image: bool) -> str:
    prompt = _render(turns, conv)
    n_img = prompt.count(DEFAULT_IMAGE_TOKEN)
    if has_image and n_img != 1:
        raise BadSample(f"record has an image but {n_img} '<image>' tokens in its prompt "
                        "(LLaVA keeps one per turn that has any)")
    return prompt


def build_prompt(conversations: List[dict], conv: Conversation, has_image: bool,
                 mm_use_im_start_end: bool = False) -> str:
    """The training prompt LLaVA builds for a record (BadSample if the record cannot be trained on)."""
    return _checked_prompt(prepare_turns(conversations, conv, has_image, mm_use_im_start_end), conv, has_image)


# ---- labels ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoundRule:
    """How LLaVA cuts a prompt into rounds and counts each round's tokens, for one template family."""
    round_sep: str  # the prompt is split on this
    answer_sep: str  # splits a round into instruction and answer; the instruction keeps it
    regroup: bool  # mpt: system + first exchange form round 0, then one round per exchange
    start: int  # tokens before round 0 that are masked (BOS)
    instruction_trim: int  # tokens of the instruction tokenized alone that are not its tokens in context
    later_round_fix: int  # added to both counts of every round after the first


def _has_round_rule(conv: Conversation) -> bool:
    return conv.sep_style == SeparatorStyle.LLAMA_2 or conv.version.startswith("v1") or conv.version == "mpt"


def _per_role(conv: Conversation) -> bool:
    """LLaVA-NeXT's `qwen` version: labels per message (preprocess_qwen), not by round arithmetic."""
    return conv.version == "qwen"


def _renders_turns(conv: Conversation) -> bool:
    """Whether the prompt is the template's own rendering (else LLaVA's v0 fallback format)."""
    return _has_round_rule(conv) or _per_role(conv)


def round_rule(conv: Conversation, legacy: bool) -> Optional[RoundRule]:
    """LLaVA's `preprocess` dispatch: llama_2 by style, v1* and mpt by version; None for plain and v0.

    The later-round fixes are LLaVA's IS_TOKENIZER_GREATER_THAN_0_14 branch (always taken: transformers 5
    needs tokenizers >= 0.22). v1: a non-legacy tokenizer does not prefix "USER" after "</s>" with '▁',
    so a later round alone has one token more than in context (-1). mpt: +1 for a legacy tokenizer.
    """
    if conv.sep_style == SeparatorStyle.LLAMA_2:
        return RoundRule(conv.sep2, "[/INST] ", False, 1, 2, 0)
    if conv.version.startswith("v1"):
        if conv.sep_style != SeparatorStyle.TWO:
            raise ValueError(f"template version {conv.version!r} trains with the TWO style, not {conv.sep_style.name}")
        return RoundRule(conv.sep2, conv.sep + conv.roles[1] + ": ", False, 1, 2, 0 if legacy else -1)
    if conv.version == "mpt":
        if conv.sep_style != SeparatorStyle.MPT:
            raise ValueError(f"template version 'mpt' trains with the MPT style, not {conv.sep_style.name}")
        return RoundRule(conv.sep, conv.sep + conv.roles[1], True, 0, 1, 1 if legacy else 0)
    return None


def _mask(labels: List[int], start: Optional[int], stop: Optional[int]) -> None:
    for k in range(*slice(start, stop).indices(len(labels))):  # tensor-slice semantics, as LLaVA's target[a:b]
        labels[k] = IGNORE_INDEX


def _round_labels(prompt: str, ids: List[int], tokenizer, rule: RoundRule) -> Tuple[List[int], int]:
    """LLaVA's length arithmetic. Returns (labels, the token count it accounts for)."""
    labels = list(ids)
    rounds = prompt.split(rule.round_sep)
    if rule.regroup:
        rounds = [rule.round_sep.join(rounds[:3])] + [rule.round_sep.join(rounds[k:k + 2])
                                                       for k in range(3, len(rounds), 2)]
    cur = rule.start
    _mask(labels, None, cur)
    for i, rnd in enumerate(rounds):
        parts = rnd.split(rule.answer_sep)
        if rnd == "" or len(parts) != 2:
            break
        round_len = len(tokenizer_image_token(rnd, tokenizer))
        instruction_len = len(tokenizer_image_token(parts[0] + rule.answer_sep, tokenizer)) - rule.instruction_trim
        if i:
            round_len += rule.later_round_fix
            instruction_len += rule.later_round_fix
        _mask(labels, cur, cur + instruction_len)
        cur += round_len
    _mask(labels, cur, None)
    return labels, cur


def _role_labels(turns: List[Tuple[str, str]], conv: Conversation, tokenizer) -> Tuple[List[int], List[int]]:
    """Per-role labels for ChatML (LLaVA-NeXT's preprocess_qwen): the system block and each message are
    tokenized as their own pieces, which special-token boundaries make exact for a byte-level BPE.

    Supervised: each answer and the <|im_end|> that ends it (generation stops there). Masked: the
    system block, user turns, the "<|im_start|>assistant\n" headers and the newline after <|im_end|>.
    (LLaVA-NeXT also supervises every <|im_start|>, <|im_end|> and "\n" token of user turns; here
    only the assistant's answers are.) Returns (ids, labels); BadSample if a piece's tokens shift.
    """
    stop = conv.sep.strip()
    bos = tokenizer.bos_token_id

    def enc(text: str, first: bool = False) -> List[int]:
        ids = tokenizer_image_token(text, tokenizer)
        # a tokenizer that adds BOS gets it once, at the front of the prompt
        return ids[1:] if not first and bos is not None and ids[:1] == [bos] else ids

    ids = enc(conv.system + conv.sep, first=True)
    labels = [IGNORE_INDEX] * len(ids)
    for j, (_, value) in enumerate(turns):
        role = conv.roles[j % 2]
        piece = enc(role + value + conv.sep)
        if j % 2 == 0:
            labels += [IGNORE_INDEX] * len(piece)
        else:
            head, upto = enc(role), enc(role + value + stop)
            if piece[:len(head)] != head or piece[:len(upto)] != upto or len(upto) <= len(head):
                raise BadSample(f"tokenization mismatch: turn {j}'s header or answer tokens change with what "
                                f"follows them (template {conv.version!r})")
            labels += [IGNORE_INDEX] * len(head) + piece[len(head):len(upto)] + [IGNORE_INDEX] * (len(piece) - len(upto))
        ids += piece
    return ids, labels


def _v0_labels(turns: List[Tuple[str, str]], conv: Conversation, ids: List[int], tokenizer,
               max_len: Optional[int]) -> List[int]:
    """LLaVA's fallback masking (_mask_targets): each human sentence but its first two tokens."""
    def count(text: str) -> int:
        n = len(tokenizer_image_token(text, tokenizer))
        return n if max_len is None else min(n, max_len)  # text-only: LLaVA counts truncated tokenizations
    lens = [count(s) for s in _v0_sentences(turns, conv)]
    labels = list(ids)
    cur = lens[0]
    _mask(labels, None, cur)
    for n, (frm, _) in zip(lens[1:], turns):
        if frm == "human":
            _mask(labels, cur + 2, cur + n)
        cur += n
    return labels


def preprocess(conversations: List[dict], conv: Conversation, tokenizer, has_image: bool,
               model_max_length: Optional[int] = None, mm_use_im_start_end: bool = False,
               legacy: Optional[bool] = None, info: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One record -> (input_ids [T], labels [T]) exactly as LLaVA's `preprocess` builds them.

    Text-only records are truncated to model_max_length (LLaVA's tokenizer call); image records are
    not (the collator truncates them, as LLaVA's does). The image sentinel is IMAGE_TOKEN_INDEX.

    Args:
        model_max_length: defaults to tokenizer.model_max_length, as in LLaVA.
        legacy: `tokenizer_is_legacy(tokenizer)` if None (pass it to skip the probe per record).
        info: if given, receives `full_len`, the token count before any truncation.

    Raises:
        BadSample: the record is malformed, LLaVA's arithmetic disagrees with the tokenizer (LLaVA would
            mask the whole sample), or no supervised token is left within model_max_length.
    """
    max_len = tokenizer.model_max_length if model_max_length is None else model_max_length
    turns = prepare_turns(conversations, conv, has_image, mm_use_im_start_end)
    prompt = _checked_prompt(turns, conv, has_image)
    ids = tokenizer_image_token(prompt, tokenizer)
    full_len = len(ids)
    if conv.sep_style == SeparatorStyle.PLAIN:
        labels = list(ids)
        _mask(labels, None, len(tokenizer_image_token(DEFAULT_IMAGE_TOKEN, tokenizer)))
    elif _per_role(conv):
        piece_ids, labels = _role_labels(turns, conv, tokenizer)
        if piece_ids != ids:  # the pieces must be the prompt's own tokens, or labels would shift
            raise BadSample(f"tokenization mismatch: the prompt tokenized whole ({len(ids)} tokens) differs from "
                            f"its messages tokenized one by one ({len(piece_ids)}; template {conv.version!r})")
    else:
        rule = round_rule(conv, tokenizer_is_legacy(tokenizer) if legacy is None else legacy)
        if rule is None:
            labels = _v0_labels(turns, conv, ids, tokenizer, None if has_image else max_len)
        else:
            labels, counted = _round_labels(prompt, ids, tokenizer, rule)
            # LLaVA checks this only below model_max_length; a long sample with shifted labels is bad too
            total = sum(1 for t in ids if t != tokenizer.pad_token_id)  # LLaVA's count: pad ids do not count
            if counted != total:
                hint = f"; the pad id {tokenizer.pad_token_id} occurs in it" if total != len(ids) else ""
                raise BadSample(f"tokenization mismatch: LLaVA's round arithmetic counts {counted} tokens, the "
                                f"tokenizer gives {total} (LLaVA masks such a sample; template {conv.version!r}{hint})")
    if info is not None:
        info["full_len"] = full_len
    if not has_image:
        ids, labels = ids[:max_len], labels[:max_len]
    if all(t == IGNORE_INDEX for t in labels[:max_len]):
        where = f"after truncation to {max_len} tokens" if full_len > max_len else "in the sample"
        raise BadSample(f"no answer token left {where}")
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


class BadSampleLog:
    """Append-only log of skipped records, one file per process, merged at the end of training."""

    def __init__(self, folder: Optional[str], strict: bool = False):
        self.folder, self.strict, self.seen, self.truncated = folder, strict, {}, {}
        if folder:
            os.makedirs(folder, exist_ok=True)

    def add(self, sample_id, reason: str, where: str):
        if self.strict:
            raise ValueError(f"bad sample {sample_id!r} ({where}): {reason}")
        key = str(sample_id)
        if key in self.seen:
            return
        self.seen[key] = reason
        if self.folder:
            path = os.path.join(self.folder, f"bad-{os.getpid()}.jsonl")
            with open(path, "a") as f:
                f.write(json.dumps({"id": key, "reason": reason, "where": where}) + "\n")

    def note_truncated(self, sample_id, reason: str):
        """A record that trains, but cut to model_max_length (LLaVA cuts silently): counted, not skipped."""
        key = str(sample_id)
        if key in self.truncated:
            return
        self.truncated[key] = reason
        if self.folder:
            with open(os.path.join(self.folder, f"truncated-{os.getpid()}.jsonl"), "a") as f:
                f.write(json.dumps({"id": key, "reason": reason, "where": "getitem"}) + "\n")

    @staticmethod
    def collect(folder: str, prefix: str = "bad-") -> Dict[str, str]:
        out = {}
        if folder and os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                if name.startswith(prefix) and name.endswith(".jsonl"):
                    for line in open(os.path.join(folder, name)):
                        rec = json.loads(line)
                        out.setdefault(rec["id"], rec["reason"])
        return out


class LazySupervisedDataset(Dataset):
    """LLaVA JSON records -> {input_ids, labels, image}. Checks what is cheap up front, the rest lazily.

    Args:
        conv: the template (`get_conv_template(version)`); it picks LLaVA's prompt and label rule.
        model_max_length: text-only records are truncated to it here, image records by the collator.
        mm_use_im_start_end: wrap '<image>' in '<im_start>' / '<im_end>' as LLaVA does.
        train_budgets: DRIP token budgets (budget.py specs); each image sample draws one per fetch, so one
            model learns to answer from any of them. None: the tower's default for every sample.
        seed: seeds those draws (a sample's k-th fetch always draws the same budget).
    """

    def __init__(self, data_path: str, tokenizer, conv: Conversation, image_folder: Optional[str],
                 image_processor=None, image_aspect_ratio: str = "square", model_max_length: int = 2048,
                 bad_log: Optional[BadSampleLog] = None, mm_use_im_start_end: bool = False,
                 train_budgets: Optional[Sequence[str]] = None, seed: int = 0):
        self.train_budgets = list(train_budgets) if train_budgets else None
        self.seed, self._fetches = seed, {}
        try:
            with open(data_path) as f:
                records = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"--data_path not found: {data_path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{data_path} is not valid JSON: {e}") from e
        if not isinstance(records, list):
            raise ValueError(f"{data_path}: expected a JSON list of records, got {type(records).__name__}")
        self.tokenizer, self.conv, self.image_folder = tokenizer, conv, image_folder
        self.image_processor, self.image_aspect_ratio = image_processor, image_aspect_ratio
        self.model_max_length, self.mm_use_im_start_end = model_max_length, mm_use_im_start_end
        self.legacy = tokenizer_is_legacy(tokenizer)
        rule = round_rule(conv, self.legacy)
        kind = ("plain" if conv.sep_style == SeparatorStyle.PLAIN else "per-role" if _per_role(conv)
                else "v0" if rule is None else "round")
        logger.info("template %r: LLaVA's %s labels (tokenizer legacy=%s)", conv.version, kind, self.legacy)
        if rule is not None and rule.start and tokenizer("a").input_ids[:1] != [tokenizer.bos_token_id]:
            logger.warning("the tokenizer adds no BOS, which LLaVA's label arithmetic assumes: multi-turn records "
                           "will be tokenization mismatches (load it with add_bos_token=True)")
        self.bad = bad_log or BadSampleLog(None)
        self.records = []
        for i, rec in enumerate(records):
            sid = rec.get("id", f"#{i}") if isinstance(rec, dict) else f"#{i}"
            try:
                self._check(rec)
            except BadSample as e:
                self.bad.add(sid, str(e), "load")
                continue
            self.records.append(rec)
        if not self.records:
            raise ValueError(f"{data_path}: no usable records ({len(self.bad.seen)} skipped)")

    def _check(self, rec):
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
            raise BadSample("record has no 'conversations' list")
        if "image" in rec:
            if not isinstance(rec["image"], str) or not rec["image"].strip():
                # LLaVA-1.5 records name one file; multi-image lists (LLaVA-NeXT interleave) are not supported
                raise BadSample(f"'image' must be one file name (a non-empty string), got {rec['image']!r:.80}")
            if self.image_folder is None or self.image_processor is None:
                raise BadSample("record has an image but no --image_folder / vision tower is set")
            path = os.path.join(self.image_folder, rec["image"])
            if not os.path.isfile(path):
                raise BadSample(f"image file missing: {path}")
        build_prompt(rec["conversations"], self.conv, "image" in rec, self.mm_use_im_start_end)

    def __len__(self):
        return len(self.records)

    def text_lengths(self) -> List[int]:
        """Words per record (LLaVA's length measure for grouping)."""
        return [sum(len(t["value"].split()) for t in r["conversations"]) for r in self.records]

    @property
    def lengths(self) -> List[int]:
        """LLaVA's: words plus 128 for an image."""
        return [n + (128 if "image" in r else 0) for r, n in zip(self.records, self.text_lengths())]

    @property
    def modality_lengths(self) -> List[int]:
        """LLaVA's: words, negative for text-only records."""
        return [n if "image" in r else -n for r, n in zip(self.records, self.text_lengths())]

    def load_image(self, rec) -> torch.Tensor:
        path = os.path.join(self.image_folder, rec["image"])
        try:
            img = open_image(path)
        except ImageError as e:
            raise BadSample(f"unreadable image {path}: {e}") from e
        if self.image_aspect_ratio == "pad":
            img = expand2square(img, tuple(int(x * 255) for x in self.image_processor.image_mean))
        return self.image_processor.preprocess(img, return_tensors="pt")["pixel_values"][0]

    def _build(self, rec):
        has_image = "image" in rec
        info = {}
        input_ids, labels = preprocess(rec["conversations"], self.conv, self.tokenizer, has_image,
                                       self.model_max_length, self.mm_use_im_start_end, self.legacy, info=info)
        if info["full_len"] > self.model_max_length:
            # image records: the sentinel counts 1 here; DRIP's visual tokens can cut more in the model
            self.bad.note_truncated(rec.get("id", "?"), f"{info['full_len']} text tokens > model_max_length "
                                    f"{self.model_max_length}: trained on its first {self.model_max_length}")
        item = {"input_ids": input_ids, "labels": labels, "id": rec.get("id")}
        if has_image:
            item["image"] = self.load_image(rec)
        return item

    def __getitem__(self, i):
        # a record that fails here is logged and replaced by the next one
        for attempt in range(len(self.records)):
            rec = self.records[(i + attempt) % len(self.records)]
            try:
                item = self._build(rec)
            except BadSample as e:
                self.bad.add(rec.get("id", f"#{(i + attempt) % len(self.records)}"), str(e), "getitem")
                continue
            if self.train_budgets and "image" in item:
                k = self._fetches[i] = self._fetches.get(i, -1) + 1
                item["budget"] = random.Random(self.seed * 1_000_003 + i * 7_919 + k).choice(self.train_budgets)
            return item
        raise RuntimeError("every record in the dataset failed to load; see the bad-sample log")


@dataclass
class DataCollatorForSupervisedDataset:
    """Pads a batch and truncates it to tokenizer.model_max_length, as LLaVA's collator does."""
    tokenizer: object
    image_shape: Optional[Tuple[int, int, int]] = None  # set when the model has a vision tower

    def __call__(self, instances: Sequence[dict]) -> dict:
        max_len = self.tokenizer.model_max_length
        ids = torch.nn.utils.rnn.pad_sequence([x["input_ids"] for x in instances], batch_first=True,
                                              padding_value=self.tokenizer.pad_token_id)[:, :max_len]
        labels = torch.nn.utils.rnn.pad_sequence([x["labels"] for x in instances], batch_first=True,
                                                 padding_value=IGNORE_INDEX)[:, :max_len]
        # by length, not ids != pad (LLaVA's): a pad id inside the text must stay visible
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for j, x in enumerate(instances):
            mask[j, : len(x["input_ids"])] = True
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask,
                 # popped by the trainer before forward; names the records of a skipped non-finite batch
                 "sample_ids": [str(x.get("id")) for x in instances]}
        if self.image_shape is not None:
            # text-only samples get a zero image used with zero length (same modules on every rank)
            batch["images"] = torch.stack([x["image"] if "image" in x else torch.zeros(self.image_shape)
                                           for x in instances])
            drawn = [x["budget"] for x in instances if "budget" in x]
            if drawn:  # text-only rows' zero image is used with zero length: any budget will do
                batch["budgets"] = [x.get("budget", drawn[0]) for x in instances]
        return batch


class ModalityLengthGroupedSampler(Sampler):
    """Batches of one modality with similar lengths (LLaVA's group_by_modality_length).

    lengths > 0 are multimodal samples (text + real visual tokens), < 0 text-only.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int, seed: int = 0):
        self.lengths, self.batch_size, self.world_size, self.seed, self.epoch = list(lengths), batch_size, world_size, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.lengths)

    def __iter__(self):
        rng = random.Random(self.seed + self.epoch)
        group = self.batch_size * self.world_size
        mega = []
        for sign in (1, -1):
            idx = [i for i, l in enumerate(self.lengths) if (l > 0) == (sign > 0)]
            rng.shuffle(idx)
            chunk = group * 8
            for k in range(0, len(idx), chunk):
                block = sorted(idx[k:k + chunk], key=lambda i: -abs(self.lengths[i]))
                mega.extend(block[m:m + group] for m in range(0, len(block), group))
        rng.shuffle(mega)
        return iter([i for batch in mega for i in batch])

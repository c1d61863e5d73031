"""LLaVA's JSON data for stage 1/2: tokenization with labels, the dataset, the collator, bad-sample accounting.

Labels are built from character spans (each assistant answer plus its separator) and the tokenizer's
offsets, not from LLaVA's per-round length arithmetic, so a template/tokenizer quirk cannot silently mask
a whole sample; a sample that ends with no supervised token is a counted bad sample instead.
"""
import json
import os
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from llava_drip.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
from llava_drip.conversation import Conversation
from llava_drip.mm_utils import expand2square, tokenizer_image_token


class BadSample(Exception):
    """A record that cannot be trained on; the reason names the field or file."""


def build_prompt(conversations: List[dict], conv: Conversation, has_image: bool) -> Tuple[str, List[Tuple[int, int]]]:
    """Render a LLaVA conversation with `conv` and return (prompt, target character spans)."""
    if not conversations:
        raise BadSample("empty 'conversations'")
    n_img = sum(t.get("value", "").count(DEFAULT_IMAGE_TOKEN) for t in conversations)
    if has_image and n_img != 1:
        raise BadSample(f"record has an image but {n_img} '<image>' tokens in its conversations")
    if not has_image and n_img:
        raise BadSample(f"record has no image but {n_img} '<image>' tokens")
    expected = ("human", "gpt")
    for j, turn in enumerate(conversations):
        if turn.get("from") != expected[j % 2] or not isinstance(turn.get("value"), str):
            raise BadSample(f"turn {j}: expected from={expected[j % 2]!r} with a string 'value', got {turn.get('from')!r}")
    if len(conversations) % 2:
        raise BadSample("conversation ends with a human turn (no answer to learn)")
    spans = []
    if conv.style == "plain":
        # stage 1: the image alone is the input, the first answer (caption) the target
        text = DEFAULT_IMAGE_TOKEN if has_image else ""
        start = len(text)
        text += conversations[1]["value"] + conv.sep
        return text, [(start, len(text))]
    text = conv.system + conv.sep
    for j, turn in enumerate(conversations):
        value = turn["value"]
        if j == 0 and has_image:  # LLaVA puts the image first in the first human turn
            value = DEFAULT_IMAGE_TOKEN + "\n" + value.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        role = conv.roles[j % 2]
        if j % 2 == 0:
            text += f"{role}: {value}{conv.sep}"
        else:
            text += f"{role}: "
            start = len(text)
            text += value + conv.sep2
            spans.append((start, len(text)))
    return text, spans


def tokenize_with_labels(prompt: str, spans: Sequence[Tuple[int, int]], tokenizer, max_len: int):
    ids, offsets = tokenizer_image_token(prompt, tokenizer, return_offsets=True)
    labels = [IGNORE_INDEX] * len(ids)
    for span_idx, (s0, s1) in enumerate(spans):
        hit = False
        for j, (a, b) in enumerate(offsets):
            if a >= 0 and b > s0 and a < s1 and b > a:
                labels[j] = ids[j]
                hit = True
        if not hit:
            raise BadSample(f"tokenization mismatch: answer {span_idx} maps to no token")
    ids, labels = ids[:max_len], labels[:max_len]
    if all(l == IGNORE_INDEX for l in labels):
        raise BadSample(f"no answer token left after truncation to {max_len} tokens")
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


class BadSampleLog:
    """Append-only log of skipped records, one file per process, merged at the end of training."""

    def __init__(self, folder: Optional[str], strict: bool = False):
        self.folder, self.strict, self.seen = folder, strict, {}
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

    @staticmethod
    def collect(folder: str) -> Dict[str, str]:
        out = {}
        if folder and os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                if name.startswith("bad-") and name.endswith(".jsonl"):
                    for line in open(os.path.join(folder, name)):
                        rec = json.loads(line)
                        out.setdefault(rec["id"], rec["reason"])
        return out


class LazySupervisedDataset(Dataset):
    """LLaVA JSON records -> {input_ids, labels, image}. Checks what is cheap up front, the rest lazily."""

    def __init__(self, data_path: str, tokenizer, conv: Conversation, image_folder: Optional[str],
                 image_processor=None, image_aspect_ratio: str = "square", model_max_length: int = 2048,
                 max_image_tokens: int = 0, bad_log: Optional[BadSampleLog] = None):
        try:
            records = json.load(open(data_path))
        except FileNotFoundError:
            raise FileNotFoundError(f"--data_path not found: {data_path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{data_path} is not valid JSON: {e}") from e
        if not isinstance(records, list):
            raise ValueError(f"{data_path}: expected a JSON list of records, got {type(records).__name__}")
        self.tokenizer, self.conv, self.image_folder = tokenizer, conv, image_folder
        self.image_processor, self.image_aspect_ratio = image_processor, image_aspect_ratio
        # reserve room for the visual tokens so splicing never truncates an answer
        self.text_max_len = model_max_length - max_image_tokens
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
            if self.image_folder is None or self.image_processor is None:
                raise BadSample("record has an image but no --image_folder / vision tower is set")
            path = os.path.join(self.image_folder, rec["image"])
            if not os.path.isfile(path):
                raise BadSample(f"image file missing: {path}")
        build_prompt(rec["conversations"], self.conv, "image" in rec)

    def __len__(self):
        return len(self.records)

    def text_lengths(self) -> List[int]:
        return [sum(len(t["value"].split()) for t in r["conversations"]) for r in self.records]

    def load_image(self, rec) -> torch.Tensor:
        path = os.path.join(self.image_folder, rec["image"])
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as e:
            raise BadSample(f"unreadable image {path}: {e}") from e
        if self.image_aspect_ratio == "pad":
            img = expand2square(img, tuple(int(x * 255) for x in self.image_processor.image_mean))
        return self.image_processor.preprocess(img, return_tensors="pt")["pixel_values"][0]

    def _build(self, rec):
        has_image = "image" in rec
        prompt, spans = build_prompt(rec["conversations"], self.conv, has_image)
        input_ids, labels = tokenize_with_labels(prompt, spans, self.tokenizer, self.text_max_len)
        item = {"input_ids": input_ids, "labels": labels, "id": rec.get("id")}
        if has_image:
            item["image"] = self.load_image(rec)
        return item

    def __getitem__(self, i):
        # a record that fails here is logged and replaced by the next one, as LLaVA does
        for attempt in range(len(self.records)):
            rec = self.records[(i + attempt) % len(self.records)]
            try:
                return self._build(rec)
            except BadSample as e:
                self.bad.add(rec.get("id", f"#{(i + attempt) % len(self.records)}"), str(e), "getitem")
        raise RuntimeError("every record in the dataset failed to load; see the bad-sample log")


@dataclass
class DataCollatorForSupervisedDataset:
    tokenizer: object
    image_shape: Optional[Tuple[int, int, int]] = None  # set when the model has a vision tower

    def __call__(self, instances: Sequence[dict]) -> dict:
        pad_id = self.tokenizer.pad_token_id
        ids = torch.nn.utils.rnn.pad_sequence([x["input_ids"] for x in instances], batch_first=True, padding_value=pad_id)
        labels = torch.nn.utils.rnn.pad_sequence([x["labels"] for x in instances], batch_first=True,
                                                 padding_value=IGNORE_INDEX)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for j, x in enumerate(instances):
            mask[j, : len(x["input_ids"])] = True
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if self.image_shape is not None:
            # text-only samples get a zero image used with zero length (same modules on every rank)
            batch["images"] = torch.stack([x["image"] if "image" in x else torch.zeros(self.image_shape)
                                           for x in instances])
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

"""Shared machinery of ``model_vqa_science`` and ``model_vqa``: load a model, build LLaVA prompts,
answer in left-padded batches, and append answers to a JSONL file that a rerun resumes.

Answers files keep LLaVA's schema, one JSON object per line::

    {"question_id", "prompt", "text", "answer_id", "model_id", "metadata": {"visual_tokens": G}}

``prompt`` is the question as LLaVA records it (no conversation template); ``visual_tokens`` is the
number of DRIP tokens the image took in the LLM (0 without an image), an extra field LLaVA's
scorers ignore.

A question whose image cannot be read (not an image, truncated, over the pixel limit) is skipped, not
fatal: it goes to ``<answers-file>.skipped`` (JSONL ``{"question_id", "image", "error"}``) so that a
resumed run neither dies on it again nor retries it (``--retry-skipped`` does), and the answers file
holds only real answers. The run ends with the count of skipped questions.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from llava_drip.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX

logger = logging.getLogger(__name__)

SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."
ANSWER_PROMPTER_SUFFIX = " ###\nANSWER:"  # LLaVA's --answer-prompter second pass
ANSWER_PROMPTER_MAX_NEW_TOKENS = 64


@dataclass
class Question:
    """One question to answer, already in LLaVA's terms."""
    qid: Any          # written back as read: ScienceQA ids are strings, LLaVA-Bench ids ints
    text: str         # the human turn without any <image> token
    prompt: str       # the "prompt" field of the answer (LLaVA's cur_prompt)
    image: str | None = None  # image path, None for a text-only question


@dataclass
class GenerationSettings:
    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1
    max_new_tokens: int = 128

    def generate_kwargs(self) -> dict:
        kw: dict = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                    "do_sample": self.temperature > 0, "use_cache": True}
        if self.temperature > 0:  # passing them with do_sample=False only earns warnings
            kw["temperature"] = self.temperature
            if self.top_p is not None:
                kw["top_p"] = self.top_p
        return kw



def check_unique_ids(path: str, questions: list[Question]) -> list[Question]:
    """Answers are keyed (and resumed) by question id: a repeated id would drop or overwrite one."""
    seen, repeated = set(), []
    for q in questions:
        key = str(q.qid)
        if key in seen:
            repeated.append(key)
        seen.add(key)
    if repeated:
        raise ValueError(f"{path}: question ids repeat: {sorted(set(repeated))[:10]}")
    return questions

def get_chunk(items: Sequence, num_chunks: int, chunk_idx: int) -> list:
    """LLaVA's split: chunks of ceil(len / num_chunks) in file order; a chunk past the end is empty."""
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"need num_chunks >= 1 and 0 <= chunk_idx < num_chunks, got {num_chunks}, {chunk_idx}")
    size = math.ceil(len(items) / num_chunks)
    return list(items[chunk_idx * size:(chunk_idx + 1) * size])


def find_missing_images(questions: Sequence[Question]) -> list[Question]:
    return [q for q in questions if q.image is not None and not os.path.isfile(q.image)]


# ----------------------------------------------------------------------------------------------
# Resumable answers file


class AnswersFile:
    """Append-only answers JSONL that knows which questions it already holds.

    A crash can leave a half-written last line; it is cut off (and its question redone). A
    malformed line elsewhere is an error, as is a file from another model (``model_id``) or made
    with another prompt, so two runs never mix silently; ``overwrite`` starts afresh.
    """

    def __init__(self, path: str | os.PathLike, model_id: str, overwrite: bool = False, retry_skipped: bool = False):
        self.path = Path(path)
        self.model_id = model_id
        self.done: dict[str, dict] = {}
        self.dropped_partial_line = False
        # questions whose image could not be read, kept apart so the answers file stays LLaVA's
        self.skip_path = Path(str(self.path) + ".skipped")
        self.skipped: dict[str, dict] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = overwrite or not self.path.exists()
        if fresh:
            self.path.write_text("", encoding="utf-8")
        else:
            self._load()
        if fresh or retry_skipped or not self.skip_path.exists():
            self.skip_path.unlink(missing_ok=True)
        else:
            self._load_skipped()
        self._f = open(self.path, "a", encoding="utf-8")
        self._skip_f = None

    def _load_skipped(self):
        for raw in self.skip_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(raw)
            except ValueError:  # a line cut by a crash: that question is simply tried again
                continue
            if isinstance(row, dict) and "question_id" in row:
                self.skipped[str(row["question_id"])] = row

    def skip(self, q: "Question", error: str):
        """Record a question left out because of its image; written at once, as answers are."""
        if self._skip_f is None:
            self._skip_f = open(self.skip_path, "a", encoding="utf-8")
        row = {"question_id": q.qid, "image": q.image, "error": error}
        self._skip_f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._skip_f.flush()
        self.skipped[str(q.qid)] = row

    def _load(self):
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
        offset = 0
        for i, raw in enumerate(lines):
            start, offset = offset, offset + len(raw) + 1
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
                if not isinstance(row, dict) or "question_id" not in row or "text" not in row:
                    raise ValueError("not an answer object")
            except (ValueError, UnicodeDecodeError) as e:
                if i != last:
                    raise ValueError(f"{self.path}:{i + 1}: malformed answer line ({e}); fix or remove "
                                     "the file, or pass --overwrite") from None
                with open(self.path, "r+b") as f:  # the crash's partial write: redo that question
                    f.truncate(start)
                self.dropped_partial_line = True
                logger.warning("%s: dropped a truncated last line (%d bytes); its question is answered again",
                               self.path, len(raw))
                break
            key = str(row["question_id"])
            if key in self.done:
                raise ValueError(f"{self.path}:{i + 1}: duplicate question_id {row['question_id']!r}")
            if row.get("model_id", self.model_id) != self.model_id:
                raise ValueError(f"{self.path}: holds answers of model {row.get('model_id')!r}, not "
                                 f"{self.model_id!r}; use another --answers-file or --overwrite")
            self.done[key] = row
        with open(self.path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size and (f.seek(size - 1), f.read(1))[1] != b"\n":
                f.write(b"\n")  # a complete last object lacking its newline

    def check_prompts(self, questions: Sequence[Question]):
        """Refuse to resume a file whose answers were made with other prompts (e.g. other flags)."""
        for q in questions:
            row = self.done.get(str(q.qid))
            if row is not None and "prompt" in row and row["prompt"] != q.prompt:
                raise ValueError(f"{self.path}: question {q.qid!r} was answered with the prompt "
                                 f"{row['prompt']!r}, now {q.prompt!r} (different question file or "
                                 "--single-pred-prompt?); use another --answers-file or --overwrite")

    def write(self, rows: Sequence[dict]):
        for row in rows:
            self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.done[str(row["question_id"])] = row
        self._f.flush()  # a crash loses at most the batch being generated

    def close(self):
        self._f.close()
        if self._skip_f is not None:
            self._skip_f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------------
# Model


def _dtype(name: str, device: str) -> torch.dtype:
    from llava_drip.model.builder import resolve_dtype
    return resolve_dtype(name, device, cuda_auto=torch.float16)  # LLaVA evaluates in fp16 on GPU


class Answerer:
    """A loaded model answering batches of ``Question`` with one conversation template."""

    def __init__(self, model_path: str, model_base: str | None = None, conv_mode: str = "vicuna_v1",
                 device: str | None = None, dtype: str = "auto", budget=None):
        """budget: DRIP visual tokens per image for every answer ('0.25', 16, 'mean:0.25'); None: the model's."""
        from llava_drip.conversation import get_conv_template
        from llava_drip.drip.budget import parse_budget
        from llava_drip.mm_utils import get_model_name_from_path
        from llava_drip.model.builder import load_pretrained_model

        self.budget = parse_budget(budget)  # a typo fails before the model loads
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.conv_template = get_conv_template(conv_mode)  # fails early on a bad name
        self.model_name = get_model_name_from_path(model_path)
        self.tokenizer, self.model, self.image_processor, self.context_len = load_pretrained_model(
            model_path, model_base, device=self.device, torch_dtype=_dtype(dtype, self.device))
        if getattr(self.model.config, "mm_use_im_start_end", False):
            raise ValueError(f"{model_path}: mm_use_im_start_end models are not supported (LLaVA-1.5 does not use them)")
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"{model_path}: the tokenizer has no pad token")
        self.max_prompt_len = getattr(self.model.config, "tokenizer_model_max_length", None)
        self.truncated_prompts = 0
        self._visual_tokens: list[int] = []
        # the tower's output list gives each image's DRIP token count without a second encoding pass
        self.model.get_vision_tower().register_forward_hook(
            lambda _m, _i, out: self._visual_tokens.extend(int(f.shape[0]) for f in out))

    def build_prompt(self, q: Question) -> str:
        conv = self.conv_template.copy()
        text = f"{DEFAULT_IMAGE_TOKEN}\n{q.text}" if q.image is not None else q.text
        conv.append_message(conv.roles[0], text)
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt()

    @staticmethod
    def read_images(batch: Sequence[Question]) -> tuple[list, dict[str, str]]:
        """(per question its RGB image or None, {question id: error} for images that cannot be read)."""
        from llava_drip.image_io import ImageError
        from llava_drip.mm_utils import load_image
        images, failed = [], {}
        for q in batch:
            img = None
            if q.image is not None:
                try:
                    img = load_image(q.image)
                except ImageError as e:  # one bad file must not end a run of thousands of questions
                    failed[str(q.qid)] = str(e)
            images.append(img)
        return images, failed

    def _images(self, batch: Sequence[Question], loaded: Sequence | None = None) -> torch.Tensor | None:
        from llava_drip.mm_utils import process_images
        if loaded is None:
            loaded, failed = self.read_images(batch)
            if failed:
                key, error = next(iter(failed.items()))
                raise ValueError(f"question {key}: {error}")
        pil = {i: img for i, img in enumerate(loaded) if img is not None}
        if not pil:
            return None
        tensors = process_images(list(pil.values()), self.image_processor, self.model.config)
        # text-only questions of a mixed batch get a zero image the model leaves out
        out = torch.zeros(len(batch), *tensors.shape[1:], dtype=tensors.dtype)
        out[list(pil)] = tensors
        return out.to(self.device, dtype=self.model.dtype)

    def _generate(self, prompts: Sequence[str], images: torch.Tensor | None,
                  settings: GenerationSettings) -> tuple[list[str], list[list[int]]]:
        """Decoded continuations of ``prompts`` (one left-padded ``generate`` call), and the prompts' ids."""
        from llava_drip.mm_utils import tokenizer_image_token
        tok = self.tokenizer
        ids = [tokenizer_image_token(p, tok) for p in prompts]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, x in enumerate(ids):  # left padding, as generation continues on the right
            input_ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[i, width - len(x):] = 1
        out = self.model.generate(input_ids.to(self.device), images=images, attention_mask=mask.to(self.device),
                                  pad_token_id=tok.pad_token_id, budget=self.budget, **settings.generate_kwargs())
        texts = []
        for row in out.tolist():
            if tok.eos_token_id in row:  # batch mates that stopped later pad this row after its EOS
                row = row[:row.index(tok.eos_token_id)]
            texts.append(tok.decode(row, skip_special_tokens=True).strip())
        return texts, ids

    def _count_truncated(self, ids: Sequence[list[int]]):
        """Count prompts longer than the model's training length (it cuts them)."""
        if not self.max_prompt_len:
            return
        for i, x in enumerate(ids):
            has_image = IMAGE_TOKEN_INDEX in x
            g = self._visual_tokens[i] if has_image and i < len(self._visual_tokens) else 0
            if len(x) - has_image + g > self.max_prompt_len:
                self.truncated_prompts += 1

    @torch.inference_mode()
    def answer(self, batch: Sequence[Question], settings: GenerationSettings,
               answer_prompter: bool = False, images: Sequence | None = None) -> list[tuple[str, int]]:
        """(answer text, visual token count) per question, in batch order.

        ``images``: the batch's images already read (``read_images``; None for text-only questions);
        without it they are read here.

        ``answer_prompter`` is LLaVA's two-pass ScienceQA prompting: the first answer (the
        reasoning) is fed back followed by `` ###\\nANSWER:`` for at most 64 more tokens, and the
        answer becomes ``reasoning + "\\n The answer is " + second``.
        """
        prompts = [self.build_prompt(q) for q in batch]
        images = self._images(batch, images)
        self._visual_tokens.clear()
        texts, ids = self._generate(prompts, images, settings)
        self._count_truncated(ids)
        counts = list(self._visual_tokens) or [0] * len(batch)
        if len(counts) != len(batch):
            raise RuntimeError(f"vision tower returned {len(counts)} feature sets for {len(batch)} images")
        if answer_prompter:
            second = dataclasses.replace(settings, max_new_tokens=ANSWER_PROMPTER_MAX_NEW_TOKENS)
            self._visual_tokens.clear()
            answers, _ = self._generate([p + t + ANSWER_PROMPTER_SUFFIX for p, t in zip(prompts, texts)], images, second)
            texts = [f"{t}\n The answer is {a}" for t, a in zip(texts, answers)]
        return [(t, counts[i] if q.image is not None else 0) for i, (q, t) in enumerate(zip(batch, texts))]


# ----------------------------------------------------------------------------------------------
# Driver shared by both scripts


def _path(text: str) -> str:
    return os.path.expanduser(text)  # LLaVA expands ~ in every path


def add_common_args(p: argparse.ArgumentParser, *, conv_mode: str):
    """The flags of LLaVA's ``model_vqa*.py`` (same names, same defaults), then ours.

    LLaVA's defaults kept: ``--temperature 0.2`` (LLaVA's scripts pass 0), 1024 new tokens, one
    chunk, ``--answers-file answer.jsonl``. ``--model-path`` and ``--question-file`` are required
    here: LLaVA's defaults (``facebook/opt-350m``, ``tables/question.json``) name no LLaVA model
    and no file of this project.
    """
    p.add_argument("--model-path", type=_path, required=True,
                   help="llava-drip model folder (full, LoRA or projector); a hub-style id names a local folder")
    p.add_argument("--model-base", type=_path, default=None, help="base LLM folder for LoRA / projector-only checkpoints")
    p.add_argument("--image-folder", default="", help="image paths in the question file are relative to it")
    p.add_argument("--question-file", type=_path, required=True)
    p.add_argument("--answers-file", type=_path, default="answer.jsonl",
                   help="answers JSONL (default answer.jsonl, as LLaVA); a rerun resumes it")
    p.add_argument("--conv-mode", default=conv_mode, help=f"conversation template (default {conv_mode})")
    p.add_argument("--num-chunks", type=int, default=1, help="split the questions into this many chunks ...")
    p.add_argument("--chunk-idx", type=int, default=0, help="... and answer this one (0-based)")
    p.add_argument("--temperature", type=float, default=0.2, help="0 = greedy (default 0.2, as LLaVA)")
    p.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None)
    p.add_argument("--num_beams", "--num-beams", dest="num_beams", type=int, default=1)
    p.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=1024,
                   help="default 1024, the number LLaVA hard-codes")
    p.add_argument("--batch-size", type=int, default=1, help="questions per generate call (default 1, as LLaVA; left-padded, same answers in fp32)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="auto: float16 on GPU (as LLaVA), float32 on CPU")
    p.add_argument("--seed", type=int, default=0, help="torch seed, for sampling (temperature > 0)")
    p.add_argument("--budget", default=None,
                   help="DRIP visual tokens per image: 0.25 (exactly round(0.25 N)), 16, mean:0.25 (calibrated "
                        "mean, counts vary per image); default: the model's own")
    p.add_argument("--skip-missing-images", action="store_true",
                   help="leave out questions whose image file is missing (counted) instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="discard an existing answers file instead of resuming it")
    p.add_argument("--retry-skipped", action="store_true",
                   help="try again the questions whose image could not be read in an earlier run "
                        "(listed in <answers-file>.skipped); without it a resumed run leaves them out")


def answer_questions(questions: list[Question], args: argparse.Namespace, answer_prompter: bool = False) -> dict:
    """Answer this chunk's questions not yet in ``args.answers_file``; returns a summary dict.

    ``answer_prompter``: LLaVA's two-pass prompting (``Answerer.answer``), model_vqa_science only.
    """
    if args.batch_size < 1 or args.num_beams < 1 or args.max_new_tokens < 1:
        raise ValueError("--batch-size, --num_beams and --max-new-tokens must be >= 1")
    total_all = len(questions)
    questions = get_chunk(questions, args.num_chunks, args.chunk_idx)
    missing = find_missing_images(questions)
    if missing and not args.skip_missing_images:
        raise FileNotFoundError(f"image not found: {missing[0].image} (question {missing[0].qid!r}; "
                                f"{len(missing)} of {len(questions)} images missing in this chunk; "
                                "check --image-folder, or pass --skip-missing-images)")
    missing_ids = {str(q.qid) for q in missing}
    todo_all = [q for q in questions if str(q.qid) not in missing_ids]

    from tqdm import tqdm
    from llava_drip.mm_utils import get_model_name_from_path
    torch.manual_seed(args.seed)
    with AnswersFile(args.answers_file, get_model_name_from_path(args.model_path), args.overwrite,
                     getattr(args, "retry_skipped", False)) as answers:
        answers.check_prompts(todo_all)
        todo = [q for q in todo_all if str(q.qid) not in answers.done and str(q.qid) not in answers.skipped]
        resumed = sum(str(q.qid) in answers.done for q in todo_all)
        answerer = None
        if todo:
            answerer = Answerer(args.model_path, args.model_base, args.conv_mode, args.device, args.dtype,
                                budget=getattr(args, "budget", None))
        settings = GenerationSettings(args.temperature, args.top_p, args.num_beams, args.max_new_tokens)
        with tqdm(total=len(todo), desc=f"answering chunk {args.chunk_idx}/{args.num_chunks}", unit="q") as bar:
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start:start + args.batch_size]
                images, failed = answerer.read_images(batch)
                for q in batch:
                    if str(q.qid) in failed:
                        answers.skip(q, failed[str(q.qid)])
                        bar.write(f"skipped question {q.qid!r}: {failed[str(q.qid)]}")
                keep = [i for i, q in enumerate(batch) if str(q.qid) not in failed]
                good = [batch[i] for i in keep]
                if good:
                    results = answerer.answer(good, settings, answer_prompter, images=[images[i] for i in keep])
                    answers.write([{"question_id": q.qid, "prompt": q.prompt, "text": text,
                                    "answer_id": uuid.uuid4().hex[:22], "model_id": answerer.model_name,
                                    "metadata": {"visual_tokens": g}}
                                   for q, (text, g) in zip(good, results)])
                bar.update(len(batch))
        with_image = {str(q.qid) for q in todo_all if q.image is not None}
        visual = [r["metadata"]["visual_tokens"] for k, r in answers.done.items()
                  if k in with_image and isinstance(r.get("metadata"), dict) and "visual_tokens" in r["metadata"]]
        unreadable = [answers.skipped[str(q.qid)] for q in todo_all if str(q.qid) in answers.skipped]
        answered = sum(str(q.qid) in answers.done for q in todo) if todo else 0
    summary = {
        "answers_file": str(args.answers_file), "questions": total_all, "chunk_questions": len(questions),
        "answered": answered, "resumed": resumed, "dropped_partial_line": answers.dropped_partial_line,
        "skipped_unreadable_images": len(unreadable), "skipped_file": str(answers.skip_path) if unreadable else None,
        "first_skip_error": unreadable[0]["error"] if unreadable else None,
        "skipped_missing_images": len(missing), "truncated_prompts": answerer.truncated_prompts if answerer else 0,
        "mean_visual_tokens": sum(visual) / len(visual) if visual else None,
    }
    print(format_summary(summary))
    return summary


def format_summary(s: dict) -> str:
    lines = [f"{s['answers_file']}: {s['answered']} answered now, {s['resumed']} already there "
             f"({s['chunk_questions']} questions in this chunk, {s['questions']} in the file)"]
    if s["dropped_partial_line"]:
        lines.append("  a truncated last line (interrupted run) was dropped and its question answered again")
    if s["skipped_missing_images"]:
        lines.append(f"  SKIPPED {s['skipped_missing_images']} questions whose image is missing (no answer written)")
    if s.get("skipped_unreadable_images"):
        lines.append(f"  SKIPPED {s['skipped_unreadable_images']} questions whose image cannot be read (no answer "
                     f"written; listed in {s['skipped_file']}, not retried on resume unless --retry-skipped), "
                     f"e.g. {s['first_skip_error']}")
    if s["truncated_prompts"]:
        lines.append(f"  WARNING {s['truncated_prompts']} prompts were longer than the model's "
                     "tokenizer_model_max_length and were cut")
    if s["mean_visual_tokens"] is not None:
        lines.append(f"  visual tokens per image (mean over this chunk's image questions): {s['mean_visual_tokens']:.2f}")
    return "\n".join(lines)

"""lmms-eval model `llava_drip`: run any lmms-eval task on a llava-drip model, unchanged lmms-eval.

    lmms-eval --model llava_drip --model_args pretrained=PATH,budget=mean:0.25,batch_size=8 --tasks TASK

The class is registered through the `lmms_eval.models` entry point (pyproject.toml), so nothing in
lmms-eval is edited. model_args:

    pretrained     model folder (full, LoRA or projector); default: the built-in tiny model
    model_base     base LLM for LoRA / projector-only folders
    conv_template  conversation template (default vicuna_v1, LLaVA-1.5's)
    budget         DRIP visual tokens per image: 0.25 (exactly round(0.25 N)), 16, mean:0.25; default the model's
    drip_eval_mode calibrated | threshold | topk | sample: the tower's boundary rule when no budget is given
    batch_size     requests per generate call (left padding; each image keeps its own token count)
    device, dtype  default cuda if available / auto (float16 on GPU, float32 on CPU)
    max_new_tokens default when a task gives none (LLaVA's 1024)

Answers come from the same `Answerer` as model_vqa (prompts, left-padded batches, image reading through
llava_drip.image_io), so lmms-eval and this project's own scripts give the same answers. One process:
lmms-eval's multi-GPU data parallelism (accelerate launch) is not supported here.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from typing import List, Optional, Tuple

import torch

from llava_drip.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX

try:  # the module imports without lmms-eval (the docs and the entry point name it); the class needs it
    from lmms_eval.api.model import lmms as _LmmsBase
except ImportError:  # pragma: no cover - lmms-eval is in the [lmms] / [test] extras
    _LmmsBase = object

logger = logging.getLogger(__name__)

MODEL_ID = "llava_drip"


def manifest():
    """The `lmms_eval.models` entry point: lmms-eval calls it to learn the model id and class."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.LlavaDrip")


def _flag(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def _one_image(visuals, where: str):
    """lmms-eval's doc_to_visual gives a list; LLaVA-1.5 models take at most one image per question."""
    if visuals is None:
        return None
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    visuals = [v for v in visuals if v is not None]
    if not visuals:
        return None
    if len(visuals) > 1:
        raise ValueError(f"{where}: {len(visuals)} images; llava-drip models take one image per question")
    from PIL import Image
    from llava_drip.image_io import open_image, to_rgb
    v = visuals[0]
    if isinstance(v, Image.Image):
        return to_rgb(v)  # EXIF, 16-bit, alpha over white: as the project reads files
    if isinstance(v, (str, bytes)):
        return open_image(v)
    raise ValueError(f"{where}: visual of type {type(v).__name__} (images only: no video or audio)")


def _passthrough(value):
    try:
        from lmms_eval.api.instance import GenerationResult
    except ImportError:  # older lmms-eval: plain tuples reach the task unchanged
        return value
    return GenerationResult(text=value)


class LlavaDrip(_LmmsBase):
    """lmms-eval's `lmms` interface over llava_drip.eval.answering.Answerer."""

    def __init__(self, pretrained: Optional[str] = None, model_base: Optional[str] = None,
                 conv_template: str = "vicuna_v1", budget: Optional[str] = None,
                 drip_eval_mode: Optional[str] = None, batch_size: int = 1, device: Optional[str] = None,
                 dtype: str = "auto", max_new_tokens: int = 1024, max_batch_size=None, **kwargs):
        super().__init__()
        if kwargs:  # a typo in --model_args must not pass unnoticed
            raise ValueError(f"llava_drip: unknown model_args {sorted(kwargs)}; known: pretrained, model_base, "
                             "conv_template, budget, drip_eval_mode, batch_size, device, dtype, max_new_tokens")
        batch_size = 1 if batch_size in (None, "auto") else batch_size
        from llava_drip.eval.answering import Answerer
        from llava_drip.serve.builtin import resolve_model_path
        path = resolve_model_path(pretrained)
        self.answerer = Answerer(path, model_base, conv_template, device, dtype, budget=budget or None)
        if drip_eval_mode:
            tower = self.answerer.model.get_vision_tower().vision_tower
            if not hasattr(tower, "eval_mode"):
                raise ValueError(f"llava_drip: drip_eval_mode={drip_eval_mode} needs a DRIP vision tower")
            from llava_drip.drip.names import EVAL_MODES
            if drip_eval_mode not in EVAL_MODES:
                raise ValueError(f"llava_drip: drip_eval_mode={drip_eval_mode!r}; expected one of {EVAL_MODES}")
            tower.eval_mode = drip_eval_mode
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError("llava_drip: batch_size must be >= 1")
        self.default_max_new_tokens = int(max_new_tokens)
        self.model_path = path
        self.visual_tokens: List[int] = []  # per answered image, for the run's report

    # lmms-eval reads these
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def tokenizer(self):
        return self.answerer.tokenizer

    @property
    def model(self):
        return self.answerer.model

    # ---- helpers --------------------------------------------------------------------------------------
    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _settings(self, gen_kwargs: dict):
        from llava_drip.eval.answering import GenerationSettings
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        temperature = float(kw.pop("temperature", 0) or 0)
        if not _flag(kw.pop("do_sample", temperature > 0)):
            temperature = 0.0
        settings = GenerationSettings(temperature=temperature, top_p=kw.pop("top_p", None),
                                      num_beams=int(kw.pop("num_beams", 1) or 1),
                                      max_new_tokens=int(kw.pop("max_new_tokens", self.default_max_new_tokens)))
        kw.pop("image_aspect_ratio", None)  # the model's own config decides (pad for LLaVA-1.5)
        if kw:
            logger.warning("llava_drip: generation kwargs %s are ignored", sorted(kw))
        return settings, [u for u in until if u]

    def _question(self, text: str, image, qid):
        from llava_drip.eval.answering import Question
        text = text.replace(DEFAULT_IMAGE_TOKEN, "").strip() if image is not None else text
        return Question(qid=qid, text=text, prompt=text, image="<lmms-eval visual>" if image is not None else None)

    @staticmethod
    def _cut(text: str, until: List[str]) -> str:
        for u in until:
            i = text.find(u)
            if i >= 0:
                text = text[:i]
        return text

    def _answer(self, questions, images, settings) -> List[str]:
        out = self.answerer.answer(questions, settings, images=images)
        self.visual_tokens.extend(n for (_, n), img in zip(out, images) if img is not None)
        return [t for t, _ in out]

    # ---- lmms-eval's interface -------------------------------------------------------------------------
    def generate_until(self, requests) -> List[str]:
        from tqdm import tqdm
        results: List[Optional[str]] = [None] * len(requests)
        groups = defaultdict(list)  # one generate call only mixes requests with the same settings
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        with tqdm(total=len(requests), desc="llava_drip answering", disable=len(requests) < 2) as bar:
            for idxs in groups.values():
                settings, until = self._settings(requests[idxs[0]].args[1])
                for start in range(0, len(idxs), self.batch_size):
                    chunk = idxs[start:start + self.batch_size]
                    questions, images = [], []
                    for i in chunk:
                        context, _, doc_to_visual, doc_id, task, split = requests[i].args
                        image = _one_image(doc_to_visual(self._doc(task, split, doc_id)),
                                           f"task {task} doc {doc_id}")
                        questions.append(self._question(context, image, doc_id))
                        images.append(image)
                    for i, text in zip(chunk, self._answer(questions, images, settings)):
                        results[i] = self._cut(text, until)
                        self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]),
                                                    results[i])
                    bar.update(len(chunk))
        return results

    def loglikelihood(self, requests) -> list:
        """(sum of log-probabilities of the continuation's tokens, whether greedy decoding gives it) per request.

        Each pair is wrapped in lmms-eval's GenerationResult: lmms-eval 0.7.3's evaluator turns any other
        non-text output into its str() (api/instance.py, unwrap_generation_output), which breaks every
        multiple_choice task; the wrapper is passed through as is."""
        from llava_drip.mm_utils import process_images, tokenizer_image_token
        a, out = self.answerer, []
        for req in requests:
            context, continuation, doc_to_visual, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            if callable(continuation):
                continuation = continuation(doc)
            image = _one_image(doc_to_visual(doc), f"task {task} doc {doc_id}")
            q = self._question(context, image, doc_id)
            prompt = a.build_prompt(q)
            ctx = tokenizer_image_token(prompt, a.tokenizer)
            full = tokenizer_image_token(prompt + continuation, a.tokenizer)
            if len(full) == len(ctx):
                raise ValueError(f"task {task} doc {doc_id}: empty continuation {continuation!r}")
            if full[:len(ctx)] != ctx:  # the boundary token merged: score from the prompt's length, as LLaVA does
                logger.warning("task %s doc %s: prompt and continuation %r share a token", task, doc_id, continuation)
            ids = torch.tensor([full], device=a.device)
            labels = ids.clone()
            labels[0, :len(ctx)] = IGNORE_INDEX
            images = None
            if image is not None:
                images = process_images([image], a.image_processor, a.model.config).to(a.device,
                                                                                      dtype=a.model.dtype)
            with torch.inference_mode():
                embeds, mask, _, lab = a.model.prepare_inputs_labels_for_multimodal(
                    ids, torch.ones_like(ids), labels, images, padding_side="right", budget=a.budget)
                logits = a.model(inputs_embeds=embeds, attention_mask=mask).logits[0, :-1].float()
            target = lab[0, 1:]
            keep = target != IGNORE_INDEX
            logp = torch.log_softmax(logits[keep], dim=-1)
            tgt = target[keep]
            total = float(logp.gather(1, tgt[:, None]).sum())
            greedy = bool((logp.argmax(-1) == tgt).all())
            out.append(_passthrough((total, greedy)))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), (total, greedy))
        return out

    def generate_until_multi_round(self, requests) -> List[Tuple[str, ...]]:
        """lmms-eval's multi-round protocol: after each round the task's doc_to_text(doc, previous_output=...,
        round_idx=..., previous_round_info=...) returns (visuals, context, done, round results, info). A
        context that is a JSON list of {"value"} turns is a conversation: its turns alternate user/assistant."""
        results = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            settings, until = self._settings(gen_kwargs)
            visuals = doc_to_visual(doc)
            rounds: List[str] = []
            info = None
            for round_idx in range(64):  # a task that never signals the end must not loop forever
                if round_idx:
                    visuals, context, done, _, info = doc_to_text(doc, previous_output=list(rounds),
                                                                   round_idx=round_idx, previous_round_info=info)
                    if done:
                        break
                image = _one_image(visuals, f"task {task} doc {doc_id}")
                rounds.append(self._cut(self._answer_conversation(context, image, settings), until))
            else:
                raise RuntimeError(f"task {task} doc {doc_id}: no end signal after 64 rounds")
            results.append(tuple(rounds))
        return results

    def _answer_conversation(self, context: str, image, settings) -> str:
        try:
            turns = json.loads(context)
        except (TypeError, ValueError):
            turns = None
        if not (isinstance(turns, list) and turns and all(isinstance(t, dict) and "value" in t for t in turns)):
            return self._answer([self._question(context, image, "multi-round")], [image], settings)[0]
        a = self.answerer
        conv = a.conv_template.copy()
        for k, t in enumerate(turns):
            text = str(t["value"]).replace(DEFAULT_IMAGE_TOKEN, "").strip()
            if k == 0 and image is not None:
                text = f"{DEFAULT_IMAGE_TOKEN}\n{text}"
            conv.append_message(conv.roles[k % 2], text)
        if len(turns) % 2 == 0:
            raise ValueError("a multi-round conversation must end with a user turn")
        conv.append_message(conv.roles[1], None)
        images = a._images([self._question("", image, "multi-round")], [image]) if image is not None else None
        texts, _ = a._generate([conv.get_prompt()], images, settings)
        return texts[0]

"""One loaded LLaVA-DRIP model answering many conversations at once: the back end of the demo, CLI chat and
HTTP API (batching: ChatEngine, docs/serve.md#batching).

Messages use OpenAI's shape, `{"role": "system" | "user" | "assistant", "content": str}`, and the
conversation holds at most one image, which goes into the first user turn (LLaVA's convention, and
what the model was trained on). Prompts are rendered with the `vicuna_v1` template by default.

A DRIP model serves any token budget without retraining (llava_drip.drip.budget): `budget="0.25"`
keeps exactly round(0.25 N) visual tokens per image, `16` exactly 16, `"mean:0.25"` the calibrated
cut (0.25 N on average, each image its own count); None is the model's default.

Cost bounds (what keeps one request from starving the others):
- a message that the model's context cannot hold is refused from its length in characters, before
  anything is tokenised (`max_prompt_chars`: the context in tokens times the longest token's length);
- an over-long conversation loses its oldest exchanges after the first, with each kept message
  tokenised about once, so fitting costs time linear in what is kept, not quadratic in the turns;
- `chat(..., cancel=event)` and `ChatStream.close()` stop generation at the next token, and a request
  still waiting for the model gives up its place as soon as it is cancelled.
"""
import collections
import logging
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image
from transformers.cache_utils import DynamicCache, DynamicLayer

from llava_drip.constants import DEFAULT_IMAGE_TOKEN
from llava_drip.conversation import get_conv_template
from llava_drip.drip.budget import Budget, BudgetLike, parse_budget
from llava_drip.image_io import open_image
from llava_drip.image_io import to_rgb as _image_io_to_rgb
from llava_drip.mm_utils import process_images, tokenizer_image_token
from llava_drip.model.llava_arch import _pad_batch
from llava_drip.model.multimodal_encoder.towers import DRIPVisionTower
from llava_drip.serve.builtin import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE

_logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")

# how often a request waiting for the model looks at its cancel event
_LOCK_POLL_S = 0.05
# an idle worker that finds 2+ requests waits until none has come for _GATHER_S (at most _GATHER_MAX_S):
# requests sent together are then encoded and prefilled together; a lone request starts at once
_GATHER_S = 0.003
_GATHER_MAX_S = 0.02
# while rows are decoding, images wait for the tower until a quarter batch of them is waiting or the
# oldest has waited this long: the tower costs about as much for 8 images as for 1
_ENCODE_WAIT_S = 0.03
# finished rows stay in the batch (their tokens ignored) until a quarter of it has finished or new rows join:
# dropping rows copies the whole KV cache, and with short answers some row finishes at almost every step
_DEAD_SHARE = 0.25
# spare sequence room a KV cache buffer gets when it is (re)allocated: at least this, or a quarter of its length
_CACHE_ROOM = 32


class MessageError(ValueError):
    """A conversation the engine refuses; `param` names the offending field ('messages[3].content')."""

    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message)
        self.param = param


class EngineBusy(RuntimeError):
    """The engine's line is full (`max_queue` requests waiting): try again later (the API answers 503)."""


@dataclass
class ChatStats:
    """What one answer cost. Visual counts are 0 for a text-only conversation."""
    visual_tokens_in: int  # patch tokens the vision tower saw
    visual_tokens_out: int  # tokens it handed to the LLM (DRIP's segments)
    prompt_tokens: int  # tokens the LLM prefilled: text plus visual
    generated_tokens: int
    latency_s: float
    finish_reason: str = "stop"  # "stop" (EOS), "length" (hit max_new_tokens) or "cancelled" (stopped early)
    budget: Optional[str] = None  # DRIP budget of the image ('0.25', '16', 'mean:0.25'); None: the model's default

    @property
    def visual_ratio(self) -> float:
        """Kept / in (1.0 keeps every patch); 0.0 without an image."""
        return self.visual_tokens_out / self.visual_tokens_in if self.visual_tokens_in else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "visual_ratio": self.visual_ratio}


@dataclass
class ImageTokens:
    """An image as the model sees it: the pixel tensor, the visual-token counts and the budget behind them."""
    pixel_values: torch.Tensor  # [1, 3, H, W]
    tokens_in: int  # patch tokens
    tokens_out: int  # tokens kept at `budget`
    budget: Optional[str] = None  # budget spec (budget_text); None: the model's default
    features: Optional[torch.Tensor] = None  # the tower's output [tokens_out, C], reused by every answer


def visual_token_summary(tokens_in: int, tokens_out: int, budget: Optional[str] = None) -> str:
    """'DRIP kept 14 of 64 visual tokens (4.6x fewer)', plus '; budget: <budget>' when one is given."""
    if tokens_out <= 0:
        text = f"DRIP kept 0 of {tokens_in} visual tokens"
    else:
        factor = tokens_in / tokens_out
        tail = f" ({factor:.1f}x fewer)" if tokens_out < tokens_in else " (no reduction)"
        text = f"DRIP kept {tokens_out} of {tokens_in} visual tokens{tail}"
    return f"{text}; budget: {budget}" if budget else text


def budget_text(budget: Optional[Budget]) -> Optional[str]:
    """A budget as the spec that parses back to it (str(Budget) keeps a ratio's point); None stays None."""
    return None if budget is None else str(budget)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, transparency over white (llava_drip.image_io owns the conversion rules)."""
    return _image_io_to_rgb(img)


ImageInput = Union[Image.Image, str, os.PathLike, bytes]


def validate_messages(messages: Sequence[dict]) -> List[dict]:
    """Check roles and order; return the messages with string content.

    Allowed: an optional leading system message, then user/assistant turns alternating,
    starting and ending with a user turn.
    """
    if not messages:
        raise ValueError("messages is empty: send at least one user message")
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role is {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise ValueError(f"messages[{i}]: a system message may only come first")
        out.append({"role": role, "content": content})
    turns = out[1:] if out[0]["role"] == "system" else out
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"turns must alternate user/assistant starting with user; "
                             f"turn {i} is {m['role']!r}")
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("the last message must be a user message")
    return out


class ChatEngine:
    """Load a model folder once; answer many conversations at a time.

    Requests from any thread go into one line; a worker thread takes up to `max_batch_size` of them,
    prefills the new prompts together and decodes all running rows one token per step with a shared
    KV cache (left padding; rows join between steps and leave when they finish). Each request keeps
    its own stopping, streaming and sampling (temperature, top_p, seed). Greedy answers are the same
    as answering alone.

    Args:
        model_path: a folder `load_pretrained_model` accepts (full, LoRA or projector checkpoint).
        model_base: base LLM folder for LoRA / projector checkpoints.
        device: torch device string.
        dtype: weights' dtype: 'auto' (bf16 on CUDA, fp32 on CPU), 'bfloat16', 'float16', 'float32'.
        conv_template: conversation template name (see llava_drip.conversation).
        max_batch_size: rows decoded together (1: one request at a time).
        max_queue: requests that may wait for a row; one more raises EngineBusy.
    """

    def __init__(self, model_path: str, model_base: Optional[str] = None, device: str = "cpu",
                 conv_template: str = "vicuna_v1", max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 max_queue: int = DEFAULT_MAX_QUEUE, dtype: str = "auto"):
        if int(max_batch_size) < 1 or int(max_queue) < 1:
            raise ValueError(f"max_batch_size and max_queue must be >= 1, got {max_batch_size} and {max_queue}")
        from llava_drip.model.builder import load_pretrained_model, resolve_dtype
        torch_dtype = resolve_dtype(dtype, device)  # a bad name fails before the load
        model_path = os.path.expanduser(model_path)
        self.model_path = model_path
        self.tokenizer, self.model, self.image_processor, self.context_len = load_pretrained_model(
            model_path, model_base=model_base, device=device, torch_dtype=torch_dtype)
        self.device = device
        self.conv_template = conv_template
        get_conv_template(conv_template)  # fail now on an unknown name, not at the first request
        # prepare_inputs_labels_for_multimodal cuts embeddings at this length; keep prompts under it
        self.max_prompt_tokens = min(self.context_len,
                                     getattr(self.model.config, "tokenizer_model_max_length", None) or self.context_len)
        # no token spans more characters than the vocabulary's longest entry, so a message longer than
        # this many characters cannot fit whatever it says: refused before the (slow) tokeniser sees it.
        # Capped at 32 a token: byte-level vocabularies hold 100+-character runs of spaces or dashes,
        # which no real message is made of, and the bound is there to keep tokenising cheap.
        longest = max((len(t) for t in self.tokenizer.get_vocab()), default=16)
        self.max_prompt_chars = self.max_prompt_tokens * min(32, max(4, longest))
        self.max_batch_size, self.max_queue = int(max_batch_size), int(max_queue)
        self._lock = threading.Lock()  # the model: held by the worker for each step and by image encoding
        self._cv = threading.Condition()  # guards the line below
        self._waiting: "collections.deque[_Request]" = collections.deque()
        self._encodes: "collections.deque[_EncodeJob]" = collections.deque()  # images waiting for the tower
        self._worker: Optional[threading.Thread] = None
        self._closed = False
        self._running = 0  # rows in the batch being decoded
        self.max_rows_seen = 0  # the largest batch decoded so far
        eos = self.model.generation_config.eos_token_id
        self._eos_ids = frozenset([self.tokenizer.eos_token_id] + (list(eos) if isinstance(eos, (list, tuple))
                                                                   else [eos] if eos is not None else []))
        stop = get_conv_template(conv_template).stop_str
        # a stop string that is not the EOS token's text ends an answer when it shows up in the text
        self._stop_text = stop if stop and stop.strip() and stop != self.tokenizer.eos_token else None
        self._prefix_state = None  # see _prefix
        self._suppress_ids: tuple = ()  # token ids never picked (tests use it to make answers run long)

    @property
    def vision_tower(self):
        return self.model.get_vision_tower()

    # ---- budgets ----------------------------------------------------------------------------------------
    @property
    def budget_kinds(self) -> tuple:
        """Budget kinds this model serves: () for a tower that keeps every patch; 'mean' needs calibration."""
        tower = self.vision_tower
        if not isinstance(tower, DRIPVisionTower):
            return ()
        return ("ratio", "count", "mean") if tower.vision_tower.is_calibrated else ("ratio", "count")

    @property
    def default_budget(self) -> Optional[str]:
        """What budget=None means here as a spec (the config's mm_drip_budget, else the eval mode's:
        'calibrated' -> 'mean:p', 'topk' -> 'p'); None for rules without one (threshold) or non-DRIP towers."""
        tower = self.vision_tower
        if not isinstance(tower, DRIPVisionTower):
            return None
        default = tower.budget if tower.budget is not None else tower.vision_tower.default_budget
        return budget_text(default)

    def budget_label(self, budget: Optional[str]) -> str:
        """A budget for people: the spec, or 'model default (mean:0.25)' for None."""
        if budget is not None:
            return budget
        default = self.default_budget
        return f"model default ({default})" if default else "model default"

    def resolve_budget(self, budget: BudgetLike) -> Optional[Budget]:
        """Parse a budget ('0.25', 0.25, '16', 16, 'mean:0.25', a Budget) and check this model can serve it.

        Returns None for None (the model's default). Raises ValueError for a malformed spec, any budget
        on a tower that is not DRIP, a count above the tower's patches, or a mean on an uncalibrated tower.
        """
        parsed = parse_budget(budget)
        if parsed is None:
            return None
        tower = self.vision_tower
        if not isinstance(tower, DRIPVisionTower):
            raise ValueError(f"a token budget needs a DRIP vision tower; this model's {tower.name} keeps all "
                             f"{tower.num_patches} patches (got budget {parsed})")
        n = tower.num_patches
        if parsed.kind == "count" and parsed.value > n:
            raise ValueError(f"budget {parsed} asks for more tokens than the tower's {n} patches; "
                             f"use at most {n} (or the ratio 1.0)")
        if parsed.kind == "mean" and not tower.vision_tower.is_calibrated:
            raise ValueError(f"budget {parsed} needs a calibrated DRIP tower (`llava-drip calibrate`); "
                             "use a ratio (0.25) or a count (16)")
        return parsed

    # ---- inputs ---------------------------------------------------------------------------------------
    def encode_image(self, image: ImageInput, budget: BudgetLike = None) -> ImageTokens:
        """Preprocess one image (any mode or size) and count the visual tokens the tower keeps.

        Args:
            image: PIL image of any mode or size, or a path / bytes read with llava_drip.image_io.open_image
                (pixel limit checked from the header; ImageError, a ValueError, when it cannot be used).
            budget: DRIP tokens to keep ('0.25', 16, 'mean:0.25'; see llava_drip.drip.budget); None:
                the model's default. ValueError for a bad budget or a budget on a non-DRIP tower.
        """
        parsed = self.resolve_budget(budget)
        rgb = to_rgb(image) if isinstance(image, Image.Image) else open_image(image)
        pixels = process_images([rgb], self.image_processor, self.model.config)
        return self._count(pixels.to(self.device, dtype=self.model.dtype), parsed)

    def _count(self, pixels: torch.Tensor, budget: Optional[Budget]) -> ImageTokens:
        """Run the tower on one image (in the worker, batched with other requests' images)."""
        job = _EncodeJob(pixels, budget)
        with self._cv:
            self._encodes.append(job)
            self._start_worker()
            self._cv.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return ImageTokens(pixels, int(self.vision_tower.num_patches), int(job.features.shape[0]),
                           budget_text(budget), job.features)

    def _run_encodes(self) -> None:
        """The tower on every waiting image: one call per budget (and image size). Holds the model lock."""
        with self._cv:
            jobs, self._encodes = list(self._encodes), collections.deque()
        groups: dict = {}
        for job in jobs:
            groups.setdefault((budget_text(job.budget), tuple(job.pixels.shape[1:])), []).append(job)
        tower = self.vision_tower
        for group in groups.values():
            try:
                pixels = torch.cat([j.pixels for j in group])
                budget = group[0].budget
                with torch.no_grad():
                    feats = tower(pixels) if budget is None else tower(pixels, budget=budget)
                for j, f in zip(group, feats):
                    j.features = f
            except Exception as e:  # noqa: BLE001  (handed to each caller, which raises it)
                for j in group:
                    j.error = e
            for j in group:
                j.done.set()

    def _image_tokens(self, image, budget: Optional[Budget]) -> Optional[ImageTokens]:
        """The conversation's image at `budget`; an ImageTokens keeps its own budget when budget is None."""
        if image is None:
            return None
        if not isinstance(image, ImageTokens):
            return self.encode_image(image, budget)
        if (budget is None or budget_text(budget) == image.budget) and image.features is not None:
            return image
        if budget is None:  # counts only (no features): encode at the image's own budget
            budget = self.resolve_budget(image.budget)
        return self._count(image.pixel_values, budget)  # same pixels, another budget

    def render_prompt(self, messages: Sequence[dict], with_image: bool) -> str:
        conv = get_conv_template(self.conv_template)
        if messages and messages[0]["role"] == "system":
            conv.system = messages[0]["content"]
            messages = messages[1:]
        for i, m in enumerate(messages):
            text = m["content"]
            if i == 0 and with_image:
                text = DEFAULT_IMAGE_TOKEN + "\n" + text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
            else:
                text = text.replace(DEFAULT_IMAGE_TOKEN, "")  # one image only: stray markers would add sentinels
            conv.append_message(conv.roles[0] if m["role"] == "user" else conv.roles[1], text)
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt()

    def check_prompt_length(self, messages: Sequence[dict]) -> List[dict]:
        """Refuse, from character counts alone, a conversation whose always-kept part cannot fit.

        Fitting may drop middle exchanges but always keeps the system message, the first exchange (it
        carries the image) and the last user turn; if one of those is over `max_prompt_chars` the prompt
        can never fit, and tokenising megabytes only to say so would hold a worker for minutes.
        Returns the validated messages; MessageError names the field (messages[i].content).
        """
        messages = validate_messages(messages)
        head = 1 if messages[0]["role"] == "system" else 0
        kept = sorted({*range(head + min(2, len(messages) - head)), len(messages) - 1})
        limit = self.max_prompt_chars
        for i in kept:
            n = len(messages[i]["content"])
            if n > limit:
                raise MessageError(f"messages[{i}].content is {n} characters; this model reads at most "
                                   f"{self.max_prompt_tokens} tokens (at most {limit} characters): shorten it",
                                   f"messages[{i}].content")
        total = sum(len(messages[i]["content"]) for i in kept)
        if total > limit:
            raise MessageError(f"messages {kept} (always kept: system, first exchange, last user turn) hold "
                               f"{total} characters; this model reads at most {self.max_prompt_tokens} tokens "
                               f"(at most {limit} characters): shorten them")
        return messages

    def _text_tokens(self, text: str) -> int:
        return len(self.tokenizer(text.replace(DEFAULT_IMAGE_TOKEN, ""), add_special_tokens=False).input_ids)

    def _fit_prompt(self, messages: List[dict], image: Optional[ImageTokens], max_new_tokens: int):
        """Tokenize, dropping the oldest exchanges after the first (it carries the image) if too long.

        The result is the one of dropping exchanges one at a time until the prompt fits, but the cost is
        linear: each middle message is tokenised on its own once (newest first, stopping when the room
        is used up), and a few exact tokenisations of the kept prompt settle the boundary.

        Returns (input_ids [1, T] with the -200 sentinel, prompt tokens the LLM sees, max_new_tokens).
        """
        visual = image.tokens_out - 1 if image is not None else 0  # the sentinel becomes G tokens
        head = 1 if messages[0]["role"] == "system" else 0
        given = len(messages)
        with_image = image is not None
        first, middle, last = messages[:head + 2], messages[head + 2:-1], messages[-1:]
        n_exchanges = len(middle) // 2 if given - head > 3 else 0  # (user, assistant) pairs that may go

        def tokenize(dropped: int):
            kept = messages if n_exchanges == 0 else first + middle[2 * dropped:] + last
            ids = tokenizer_image_token(self.render_prompt(kept, with_image), self.tokenizer, return_tensors="pt")
            return ids, int(ids.shape[0]) + visual

        def fits(n: int) -> bool:
            return n <= self.max_prompt_tokens

        def small_enough(j: int) -> bool:  # exchange j could be tokenised (and kept) at all
            return len(middle[2 * j]["content"]) + len(middle[2 * j + 1]["content"]) <= self.max_prompt_chars

        dropped = 0
        ids, n_prompt = tokenize(0) if n_exchanges == 0 else tokenize(n_exchanges)  # the always-kept part
        if n_exchanges and fits(n_prompt):
            # what one exchange costs beyond its text (role names, separators), measured on this template
            probe = first + [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}] + last
            n_probe = int(tokenizer_image_token(self.render_prompt(probe, with_image), self.tokenizer,
                                                return_tensors="pt").shape[0]) + visual
            overhead = n_probe - n_prompt - self._text_tokens("x") - self._text_tokens("y")
            room, kept = self.max_prompt_tokens - n_prompt, 0
            for j in range(n_exchanges - 1, -1, -1):  # newest first: the oldest go first
                if not small_enough(j):
                    break
                cost = (self._text_tokens(middle[2 * j]["content"]) +
                        self._text_tokens(middle[2 * j + 1]["content"]) + overhead)
                if cost > room:
                    break
                room -= cost
                kept += 1
            # the estimate ignores merges across message boundaries: settle it on exact counts
            dropped = n_exchanges - kept
            ids, n_prompt = tokenize(dropped)
            if fits(n_prompt):
                while dropped > 0 and small_enough(dropped - 1):
                    more_ids, more = tokenize(dropped - 1)
                    if not fits(more):
                        break
                    dropped, ids, n_prompt = dropped - 1, more_ids, more
            else:
                while not fits(n_prompt) and dropped < n_exchanges:
                    dropped += 1
                    ids, n_prompt = tokenize(dropped)
        elif n_exchanges:
            dropped = n_exchanges
        if dropped:
            _logger.info("dropped %d old messages to fit the prompt in %d tokens", 2 * dropped,
                         self.max_prompt_tokens)
        if not fits(n_prompt):
            raise MessageError(f"the prompt is {n_prompt} tokens (visual {visual + 1 if image else 0}); "
                               f"this model takes at most {self.max_prompt_tokens}")
        max_new_tokens = max(1, min(int(max_new_tokens), self.context_len - n_prompt))
        return ids.unsqueeze(0), n_prompt, max_new_tokens

    def _request(self, ids, image, temperature, top_p, max_new_tokens, seed, streaming) -> "_Request":
        sample = temperature is not None and float(temperature) > 0
        generator = None
        if sample and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        return _Request(ids=ids[0], features=image.features if image is not None else None,
                        max_new_tokens=int(max_new_tokens), temperature=float(temperature) if sample else 0.0,
                        top_p=float(top_p), generator=generator, cancel=threading.Event(),
                        pieces=queue.SimpleQueue() if streaming else None)

    def _prepare(self, messages, image, temperature, top_p, max_new_tokens, budget, seed=None, streaming=False):
        messages = self.check_prompt_length(messages)  # validates too; before any image or tokeniser work
        if not 0 <= float(temperature) <= 2:
            raise ValueError(f"temperature must be in [0, 2], got {temperature}")
        if not 0 < float(top_p) <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if int(max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        tokens = self._image_tokens(image, self.resolve_budget(budget))  # checked with or without an image
        ids, n_prompt, max_new = self._fit_prompt(messages, tokens, max_new_tokens)
        req = self._request(ids.to(self.device), tokens, temperature, top_p, max_new, seed, streaming)
        return tokens, n_prompt, req

    def _stats(self, tokens, n_prompt, new_ids: torch.Tensor, max_new: int, t0: float,
               cancelled: bool = False) -> ChatStats:
        ended = bool(new_ids.numel()) and int(new_ids[-1]) in self._eos_ids
        n = int(new_ids.numel())
        reason = "stop" if ended else "length" if n >= max_new else "cancelled" if cancelled else "stop"
        return ChatStats(tokens.tokens_in if tokens else 0, tokens.tokens_out if tokens else 0, n_prompt,
                         n, time.perf_counter() - t0, reason, tokens.budget if tokens else None)

    # ---- the batcher: one worker thread runs every request's decoding, many rows at a time -------------
    def _submit(self, req: "_Request") -> None:
        """Queue a request for the worker; EngineBusy when `max_queue` requests are already waiting."""
        with self._cv:
            if self._closed:
                raise RuntimeError("this ChatEngine is closed")
            if len(self._waiting) >= self.max_queue:
                raise EngineBusy(f"{len(self._waiting)} requests are waiting for the model (max_queue="
                                 f"{self.max_queue}); try again shortly")
            self._waiting.append(req)
            self._start_worker()
            self._cv.notify()

    def close(self) -> None:
        """Stop the worker once the requests in flight are answered; later requests raise RuntimeError.
        (The worker holds the engine, so an engine that is dropped without close() stays in memory.)"""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=60)

    def _start_worker(self) -> None:  # with self._cv held
        if self._closed:
            raise RuntimeError("this ChatEngine is closed")
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="llava-drip-batcher", daemon=True)
            self._worker.start()

    def _withdraw(self, req: "_Request") -> None:
        """Take a cancelled request out of the line if the worker has not taken it yet."""
        with self._cv:
            if req in self._waiting:
                self._waiting.remove(req)
            else:
                return
        self._finish(req)

    def _wait(self, req: "_Request") -> torch.Tensor:
        """Block until `req` is done (leaving the line at once if it is cancelled while waiting); its new ids."""
        while not req.done.wait(_LOCK_POLL_S):
            if req.cancel.is_set():
                self._withdraw(req)
        if req.error is not None:
            raise req.error
        return torch.tensor(req.new_ids, dtype=torch.long)

    def _finish(self, req: "_Request") -> None:
        if req.done.is_set():
            return
        if req.cancel.is_set() and not req.stop_hit:
            self._log_cancel(torch.tensor(req.new_ids, dtype=torch.long), req.max_new_tokens)
        if req.pieces is not None:
            req.pieces.put(None)
        req.done.set()

    def _work(self) -> None:
        """The worker: admit waiting requests (prefilled together, then merged into the running batch),
        then advance every running row by one token; rows leave the batch as they finish."""
        batch: Optional[_Batch] = None
        while True:
            with self._cv:
                while not self._waiting and not self._encodes and batch is None:
                    if self._closed:
                        return
                    self._cv.wait()
                if batch is None:  # idle until now: a burst (2+ waiting) may still be arriving; let it
                    seen, deadline = 1, time.perf_counter() + _GATHER_MAX_S  # settle, to share one call
                    while seen < len(self._waiting) + len(self._encodes) and time.perf_counter() < deadline:
                        seen = len(self._waiting) + len(self._encodes)
                        self._cv.wait(_GATHER_S)
            joining: List[_Request] = []
            involved = list(batch.live_reqs) if batch else []
            try:
                with self._lock:  # the model; taken before the line so a waiting request can still withdraw
                    if self._encodes and (batch is None or len(self._encodes) >= self.max_batch_size // 4 or
                                          time.perf_counter() - self._encodes[0].since > _ENCODE_WAIT_S):
                        self._run_encodes()
                    with self._cv:
                        if batch is not None and self._waiting and batch.dead:
                            batch = batch.compact()  # make room; the merge below copies the cache anyway
                        room = self.max_batch_size - (len(batch.reqs) if batch else 0)
                        if batch is None or batch.mergeable:
                            while self._waiting and len(joining) < room:
                                req = self._waiting.popleft()
                                if req.cancel.is_set():
                                    self._finish(req)
                                else:
                                    joining.append(req)
                    involved += joining
                    with torch.no_grad():
                        if joining:
                            new = self._prefill(joining)
                            new = self._emit(new, new.last)
                            if new is not None:
                                batch = new if batch is None else batch.merge(new)
                        if batch is not None:
                            self.max_rows_seen = max(self.max_rows_seen, batch.live)
                            batch = self._emit(batch, self._step(batch))
                        self._running = batch.live if batch else 0
            except BaseException as e:  # every request in flight gets the error; the worker lives on
                _logger.exception("generation failed")
                for req in involved:
                    req.error = e
                    self._finish(req)
                batch, self._running = None, 0

    def _prefix(self):
        """(ids [P], per-layer (keys, values) [1, H, P, D]) of the start every prompt of the template shares
        (the system message and the first role name), run through the LLM once and reused by every
        request that starts with it; None when there is none worth it or the cache cannot be shared."""
        if self._prefix_state is None:
            self._prefix_state = (None,)
            texts = [self.render_prompt([{"role": "user", "content": t}], with_image)
                     for t in ("a", "Zq 17?") for with_image in (False, True)]
            ids = [tokenizer_image_token(t, self.tokenizer) for t in texts]
            n = 0
            while all(len(x) > n + 1 for x in ids) and len({x[n] for x in ids}) == 1 and ids[0][n] >= 0:
                n += 1
            n -= 1  # the last shared token might merge with what follows in another prompt
            if n >= 4:
                prefix = torch.tensor(ids[0][:n], device=self.device)
                cache = self.model(input_ids=prefix[None], use_cache=True).cache
                if all(type(layer) in _PLAIN_LAYERS for layer in cache.layers):
                    self._prefix_state = (prefix, [(layer.keys, layer.values) for layer in cache.layers])
        return self._prefix_state if self._prefix_state[0] is not None else None

    def _prefill(self, reqs: List["_Request"]) -> "_Batch":
        """Prefill new requests: those that start with the shared prefix reuse its KV cache, the others run
        whole; both groups end up in one batch."""
        prefix = self._prefix()
        if prefix is None:
            return self._prefill_group(reqs, None)
        n = prefix[0].numel()
        shared = [r.ids.numel() > n and torch.equal(r.ids[:n], prefix[0]) for r in reqs]
        batch = None
        for group, pre in (([r for r, s in zip(reqs, shared) if s], prefix),
                           ([r for r, s in zip(reqs, shared) if not s], None)):
            if group:
                part = self._prefill_group(group, pre)
                batch = part if batch is None else batch.merge(part)
        return batch

    def _prefill_group(self, reqs: List["_Request"], prefix) -> "_Batch":
        """Embed the prompts (images spliced in, one projector call for all), left-pad them, run the LLM
        on them (after the shared prefix's cache, if given) and pick each row's first token."""
        model = self.model
        skip = prefix[0].numel() if prefix is not None else 0
        feats = [r.features for r in reqs if r.features is not None]
        projected = iter(model.project_features(feats) if feats else [])
        embeds, labels = [], []
        for r in reqs:
            f = [next(projected)] if r.features is not None else None
            e, _, _, lab = model.prepare_inputs_labels_for_multimodal(r.ids[skip:][None], None, None, None,
                                                                      image_features=f)
            embeds.append(e[0])
            labels.append(lab[0])
        embeds, mask, pos, _ = _pad_batch(embeds, labels, "left")
        cache = _roomy_cache(model.config)
        if prefix is not None:  # rows read [prefix][left padding][their own tokens]
            b = len(reqs)
            for i, (k, v) in enumerate(prefix[1]):
                cache.update(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), i)
            mask = torch.cat([mask.new_ones(b, skip), mask], dim=1)
            pos = pos + skip
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                    logits_to_keep=1)
        return _Batch(reqs, out.cache, mask, pos[:, -1] + 1, self._pick(out.logits[:, -1], reqs))

    def _step(self, batch: "_Batch") -> torch.Tensor:
        """Feed every row its last token; the next token of each row."""
        ones = batch.mask.new_ones(batch.mask.shape[0], 1)
        batch.mask = torch.cat([batch.mask, ones], dim=1)
        out = self.model(input_ids=batch.last[:, None], attention_mask=batch.mask, position_ids=batch.pos[:, None],
                         cache=batch.cache, use_cache=True)
        batch.cache = out.cache
        batch.pos = batch.pos + 1
        return self._pick(out.logits[:, -1], batch.reqs)

    def _pick(self, logits: torch.Tensor, reqs: List["_Request"]) -> torch.Tensor:
        """Next token per row: greedy, or each request's own temperature / top-p (and seed)."""
        logits = logits.float()
        if self._suppress_ids:
            logits[:, list(self._suppress_ids)] = float("-inf")
        picked = logits.argmax(dim=-1)
        for i, r in enumerate(reqs):
            if r.temperature > 0 and not r.done.is_set():  # finished rows still in the batch draw nothing
                probs = torch.softmax(logits[i] / r.temperature, dim=-1)
                if r.top_p < 1:
                    sorted_p, order = probs.sort(descending=True)
                    sorted_p[(sorted_p.cumsum(0) - sorted_p) > r.top_p] = 0  # the smallest set holding top_p
                    probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
                picked[i] = torch.multinomial(probs, 1, generator=r.generator)[0]
        return picked

    def _emit(self, batch: "_Batch", tokens: torch.Tensor) -> Optional["_Batch"]:
        """Hand each row its token (stream pieces, stop checks); drop the finished rows; None if none is left."""
        keep = []
        for i, (req, tok) in enumerate(zip(batch.reqs, tokens.tolist())):
            if req.done.is_set():  # finished earlier, still in the batch (see _DEAD_SHARE)
                continue
            req.new_ids.append(tok)
            done = tok in self._eos_ids or len(req.new_ids) >= req.max_new_tokens or req.cancel.is_set()
            if req.pieces is not None or self._stop_text:
                text = self.tokenizer.decode(req.new_ids, skip_special_tokens=True)
                if self._stop_text and self._stop_text in text:
                    text, req.stop_hit, done = text[:text.index(self._stop_text)], True, True
                if req.pieces is not None and text.startswith(req.sent) and not text.endswith("\ufffd"):
                    if len(text) > len(req.sent):
                        req.pieces.put(text[len(req.sent):])
                        req.sent = text
            if done:
                self._finish(req)
            else:
                keep.append(i)
        batch.last = tokens
        if not keep:
            return None
        if len(batch.reqs) - len(keep) >= max(1, _DEAD_SHARE * len(batch.reqs)):
            return batch.select(keep)
        return batch

    def _log_cancel(self, new_ids: torch.Tensor, max_new: int) -> None:
        """Say in the log that an answer was cut short (the log is where an operator sees abandoned requests)."""
        n = int(new_ids.numel())
        if n < max_new and not (n and int(new_ids[-1]) in self._eos_ids):
            _logger.info("generation cancelled after %d of %d new tokens", n, max_new)

    def _decode(self, new_ids: torch.Tensor) -> str:
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        if self._stop_text and self._stop_text in text:  # the EOS token's own text is skipped above
            text = text[:text.index(self._stop_text)]
        return text.strip()

    # ---- answering --------------------------------------------------------------------------------------
    def chat(self, messages: Sequence[dict], image: "Image.Image | ImageTokens | None" = None,
             temperature: float = 0.2, top_p: float = 0.7, max_new_tokens: int = 128, budget: BudgetLike = None,
             cancel: Optional[threading.Event] = None, seed: Optional[int] = None):
        """Answer the last user message. Returns (text, ChatStats).

        Args:
            messages: OpenAI-style messages, string content, ending with a user turn.
            image: the conversation's image (PIL of any mode/size, or an `encode_image` result), or None.
            temperature: 0 for greedy decoding.
            budget: DRIP visual tokens for the image ('0.25', 16, 'mean:0.25'); None: an ImageTokens'
                own budget, else the model's default. The stats report the budget and the kept count.
            cancel: set it (from any thread) to stop: generation ends at the next token, or never starts
                if the request is still waiting for the model; finish_reason is then "cancelled".
            seed: makes a sampled answer reproducible (its own generator, whatever else is in the batch).
        Raises EngineBusy when the line is full.
        """
        t0 = time.perf_counter()
        tokens, n_prompt, req = self._prepare(messages, image, temperature, top_p, max_new_tokens, budget, seed)
        if cancel is not None:
            req.cancel = cancel
        self._submit(req)
        new_ids = self._wait(req)
        cancelled = req.cancel.is_set() and not req.stop_hit
        return self._decode(new_ids), self._stats(tokens, n_prompt, new_ids, req.max_new_tokens, t0, cancelled)

    def stream(self, messages: Sequence[dict], image: "Image.Image | ImageTokens | None" = None,
               temperature: float = 0.2, top_p: float = 0.7, max_new_tokens: int = 128,
               budget: BudgetLike = None, seed: Optional[int] = None) -> "ChatStream":
        """Like `chat`, but returns a ChatStream: iterate it for text pieces, then read `.stats`.

        Input errors (a bad budget included) and EngineBusy raise here, before any generation starts.
        """
        t0 = time.perf_counter()
        tokens, n_prompt, req = self._prepare(messages, image, temperature, top_p, max_new_tokens, budget, seed,
                                              streaming=True)
        self._submit(req)
        return ChatStream(self, req, lambda new_ids, cancelled: self._stats(
            tokens, n_prompt, new_ids, req.max_new_tokens, t0, cancelled))


@dataclass(eq=False)
class _Request:
    """One answer in the making: what the worker needs, and what it writes back."""
    ids: torch.Tensor  # [T] prompt ids with the image sentinel
    features: Optional[torch.Tensor]  # the tower's output for the sentinel, or None
    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    generator: Optional[torch.Generator]
    cancel: threading.Event
    pieces: Optional[queue.SimpleQueue] = None  # streamed text pieces, then None
    new_ids: List[int] = field(default_factory=list)
    sent: str = ""  # text streamed so far
    stop_hit: bool = False  # the template's stop string ended the answer: a normal stop
    error: Optional[BaseException] = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class _EncodeJob:
    """One image for the tower; the worker fills in `features` (or `error`) and sets `done`."""
    pixels: torch.Tensor  # [1, 3, H, W]
    budget: Optional[Budget]
    features: Optional[torch.Tensor] = None
    error: Optional[BaseException] = None
    done: threading.Event = field(default_factory=threading.Event)
    since: float = field(default_factory=time.perf_counter)


class _RoomyLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views into buffers with spare room along the sequence, so a
    decode step writes its one column in place instead of copying the whole cache (DynamicLayer's torch.cat).
    Code that assigns `.keys` / `.values` itself (row selection, merging, transformers' own helpers) hands
    over plain tensors; the next update sees they are not views of the buffers and copies them into new ones."""

    def __init__(self):
        super().__init__()
        self._kbuf = self._vbuf = None

    def _fits(self, n: int) -> bool:
        kb, vb = self._kbuf, self._vbuf
        return (kb is not None and n <= kb.shape[-2] and self.keys.data_ptr() == kb.data_ptr()
                and self.values.data_ptr() == vb.data_ptr() and self.keys.shape[0] == kb.shape[0]
                and self.keys.stride() == kb.stride() and self.values.stride() == vb.stride())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        t = key_states.shape[-2]
        if not self._fits(n + t):
            cap = n + t + max(_CACHE_ROOM, (n + t) // 4)
            kb = key_states.new_empty(*key_states.shape[:2], cap, key_states.shape[-1])
            vb = value_states.new_empty(*value_states.shape[:2], cap, value_states.shape[-1])
            if n:
                kb[:, :, :n], vb[:, :, :n] = self.keys, self.values
            self._kbuf, self._vbuf = kb, vb
        self._kbuf[:, :, n:n + t] = key_states
        self._vbuf[:, :, n:n + t] = value_states
        self.keys, self.values = self._kbuf[:, :, :n + t], self._vbuf[:, :, :n + t]
        return self.keys, self.values

    def reset(self) -> None:
        self._kbuf = self._vbuf = None
        super().reset()


_PLAIN_LAYERS = (DynamicLayer, _RoomyLayer)  # caches rows can be padded, selected and joined in


def _roomy_cache(config) -> DynamicCache:
    """The model's DynamicCache with each plain layer made a _RoomyLayer (sliding-window layers stay as they are)."""
    cache = DynamicCache(config=config)
    cache.layers = [_RoomyLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    if cache.layer_class_to_replicate is DynamicLayer:  # layers made on first use (no layer types in the config)
        cache.layer_class_to_replicate = _RoomyLayer
    return cache


def _left_pad(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [n, 0]
    return F.pad(x, pad)


class _Batch:
    """Rows decoding together: the KV cache, the left-padded attention mask, each row's next position
    and last token. Rows are dropped when they finish; new rows are merged in between steps."""

    def __init__(self, reqs, cache, mask, pos, last):
        self.reqs, self.cache, self.mask, self.pos, self.last = list(reqs), cache, mask, pos, last

    @property
    def live_reqs(self) -> List["_Request"]:
        return [r for r in self.reqs if not r.done.is_set()]

    @property
    def live(self) -> int:
        return sum(not r.done.is_set() for r in self.reqs)

    @property
    def dead(self) -> int:
        return len(self.reqs) - self.live

    def compact(self) -> Optional["_Batch"]:
        """Drop the finished rows still in the batch."""
        return self.select([i for i, r in enumerate(self.reqs) if not r.done.is_set()])

    @property
    def mergeable(self) -> bool:
        """Plain growing caches can be padded and joined; others (sliding windows) run to the end first."""
        return all(type(layer) in _PLAIN_LAYERS for layer in self.cache.layers)

    def select(self, keep: List[int]) -> Optional["_Batch"]:
        if not keep:
            return None
        if len(keep) < len(self.reqs):
            idx = torch.tensor(keep, device=self.mask.device)
            self.cache.batch_select_indices(idx)
            self.reqs = [self.reqs[i] for i in keep]
            self.mask, self.pos, self.last = self.mask[idx], self.pos[idx], self.last[idx]
            lead = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # columns no row reads any more
            if lead and self.mergeable:
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
                self.mask = self.mask[:, lead:]
        return self

    def merge(self, other: "_Batch") -> "_Batch":
        mine, theirs = self.mask.shape[1], other.mask.shape[1]
        n = max(mine, theirs)
        for a, b in zip(self.cache.layers, other.cache.layers):
            a.keys = torch.cat([_left_pad(a.keys, n - mine, 2), _left_pad(b.keys, n - theirs, 2)])
            a.values = torch.cat([_left_pad(a.values, n - mine, 2), _left_pad(b.values, n - theirs, 2)])
        self.mask = torch.cat([_left_pad(self.mask, n - mine, 1), _left_pad(other.mask, n - theirs, 1)])
        self.reqs += other.reqs
        self.pos, self.last = torch.cat([self.pos, other.pos]), torch.cat([self.last, other.last])
        return self


class ChatStream:
    """Text pieces of one answer as the worker produces them.

    `close()` (or leaving a `with` block) stops generation early, e.g. when an HTTP client goes away.
    """

    def __init__(self, engine: ChatEngine, req: _Request, make_stats):
        self._engine, self._req, self._make_stats = engine, req, make_stats
        self.text = ""
        self.stats: Optional[ChatStats] = None

    def __iter__(self) -> Iterator[str]:
        req = self._req
        drained = False
        try:
            while True:
                try:
                    piece = req.pieces.get(timeout=_LOCK_POLL_S)
                except queue.Empty:
                    if req.cancel.is_set():
                        self._engine._withdraw(req)  # closed while still waiting: leave the line
                    continue
                if piece is None:
                    break
                self.text += piece
                yield piece
            drained = True
        finally:
            if not drained:  # the consumer dropped the iterator: stop generating
                self.close()
        new_ids = self._engine._wait(req)
        cancelled = req.cancel.is_set() and not req.stop_hit
        self.stats = self._make_stats(new_ids, cancelled)
        self.text = self._engine._decode(new_ids) if not cancelled else self.text.strip()

    def close(self):
        """Stop generating (at the next token; at once if still waiting for the model). Idempotent."""
        self._req.cancel.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        try:
            self._engine._wait(self._req)
        except Exception:  # the error belongs to whoever iterates; leaving the block only stops it
            pass


__all__ = ["ChatEngine", "ChatStats", "ChatStream", "EngineBusy", "ImageTokens", "MessageError", "budget_text",
           "visual_token_summary", "validate_messages"]

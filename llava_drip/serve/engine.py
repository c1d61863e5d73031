"""One loaded LLaVA-DRIP model behind a lock: the shared back end of the demo, CLI chat and HTTP API.

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
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator, List, Optional, Sequence, Union

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from llava_drip.constants import DEFAULT_IMAGE_TOKEN
from llava_drip.conversation import get_conv_template
from llava_drip.drip.budget import Budget, BudgetLike, parse_budget
from llava_drip.image_io import open_image
from llava_drip.image_io import to_rgb as _image_io_to_rgb
from llava_drip.mm_utils import process_images, tokenizer_image_token
from llava_drip.model.multimodal_encoder.towers import DRIPVisionTower

_logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")

# how often a request waiting for the model looks at its cancel event
_LOCK_POLL_S = 0.05


class MessageError(ValueError):
    """A conversation the engine refuses; `param` names the offending field ('messages[3].content')."""

    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message)
        self.param = param


class Cancelled(Exception):
    """Raised inside the engine when a request is cancelled before it reaches the model."""


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
    """Load a model folder once; answer conversations one at a time (a lock guards generate).

    Args:
        model_path: a folder `load_pretrained_model` accepts (full, LoRA or projector checkpoint).
        model_base: base LLM folder for LoRA / projector checkpoints.
        device: torch device string.
        conv_template: conversation template name (see llava_drip.conversation).
    """

    def __init__(self, model_path: str, model_base: Optional[str] = None, device: str = "cpu",
                 conv_template: str = "vicuna_v1"):
        from llava_drip.model.builder import load_pretrained_model
        model_path = os.path.expanduser(model_path)
        self.model_path = model_path
        self.tokenizer, self.model, self.image_processor, self.context_len = load_pretrained_model(
            model_path, model_base=model_base, device=device)
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
        self._lock = threading.Lock()

    @property
    def vision_tower(self):
        return self.model.get_vision_tower()

    @contextmanager
    def _turn(self, cancel: Optional[threading.Event] = None):
        """Hold the model; while waiting for it, give up (Cancelled) once `cancel` is set, so a request
        whose client has gone does not keep a place in the line."""
        if cancel is None:
            self._lock.acquire()
        else:
            while not self._lock.acquire(timeout=_LOCK_POLL_S):
                if cancel.is_set():
                    raise Cancelled()
            if cancel.is_set():
                self._lock.release()
                raise Cancelled()
        try:
            yield
        finally:
            self._lock.release()

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

    @torch.no_grad()
    def _count(self, pixels: torch.Tensor, budget: Optional[Budget]) -> ImageTokens:
        tower = self.vision_tower
        with self._lock:
            feats = tower(pixels) if budget is None else tower(pixels, budget=budget)
        return ImageTokens(pixels, int(tower.num_patches), int(feats[0].shape[0]), budget_text(budget))

    def _image_tokens(self, image, budget: Optional[Budget]) -> Optional[ImageTokens]:
        """The conversation's image at `budget`; an ImageTokens keeps its own budget when budget is None."""
        if image is None:
            return None
        if not isinstance(image, ImageTokens):
            return self.encode_image(image, budget)
        if budget is None or budget_text(budget) == image.budget:
            return image
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

    def _generate_kwargs(self, ids, image, temperature, top_p, max_new_tokens) -> dict:
        sample = temperature is not None and temperature > 0
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=sample,
                      images=image.pixel_values if image is not None else None,
                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        if image is not None and image.budget is not None:
            kwargs["budget"] = image.budget  # generate encodes the image again: at the budget it was counted at
        if sample:
            kwargs.update(temperature=float(temperature), top_p=float(top_p))
        else:  # the checkpoint's generation_config may carry sampling values that greedy would warn about
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def _prepare(self, messages, image, temperature, top_p, max_new_tokens, budget):
        messages = self.check_prompt_length(messages)  # validates too; before any image or tokeniser work
        if not 0 <= float(temperature) <= 2:
            raise ValueError(f"temperature must be in [0, 2], got {temperature}")
        if not 0 < float(top_p) <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if int(max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        tokens = self._image_tokens(image, self.resolve_budget(budget))  # checked with or without an image
        ids, n_prompt, max_new = self._fit_prompt(messages, tokens, max_new_tokens)
        ids = ids.to(self.device)
        return tokens, n_prompt, self._generate_kwargs(ids, tokens, temperature, top_p, max_new), ids

    def _stats(self, tokens, n_prompt, new_ids: torch.Tensor, max_new: int, t0: float,
               cancelled: bool = False) -> ChatStats:
        ended = bool(new_ids.numel()) and int(new_ids[-1]) == self.tokenizer.eos_token_id
        n = int(new_ids.numel())
        reason = "stop" if ended else "length" if n >= max_new else "cancelled" if cancelled else "stop"
        return ChatStats(tokens.tokens_in if tokens else 0, tokens.tokens_out if tokens else 0, n_prompt,
                         n, time.perf_counter() - t0, reason, tokens.budget if tokens else None)

    def _generate(self, ids, kwargs, cancel: Optional[threading.Event]) -> torch.Tensor:
        """New token ids; stops at the next token once `cancel` is set (empty if cancelled while waiting)."""
        if cancel is not None:
            kwargs = dict(kwargs, stopping_criteria=StoppingCriteriaList([_CancelCriteria(cancel)]))
        try:
            with self._turn(cancel):
                return self.model.generate(ids, **kwargs)[0]
        except Cancelled:
            return torch.zeros(0, dtype=torch.long)

    def _log_cancel(self, new_ids: torch.Tensor, max_new: int) -> None:
        """Say in the log that an answer was cut short (the log is where an operator sees abandoned requests)."""
        n = int(new_ids.numel())
        if n < max_new and not (n and int(new_ids[-1]) == self.tokenizer.eos_token_id):
            _logger.info("generation cancelled after %d of %d new tokens", n, max_new)

    def _decode(self, new_ids: torch.Tensor) -> str:
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        stop = get_conv_template(self.conv_template).stop_str
        if stop and stop.strip() and stop in text:
            text = text[:text.index(stop)]
        return text.strip()

    # ---- answering --------------------------------------------------------------------------------------
    def chat(self, messages: Sequence[dict], image: "Image.Image | ImageTokens | None" = None,
             temperature: float = 0.2, top_p: float = 0.7, max_new_tokens: int = 128, budget: BudgetLike = None,
             cancel: Optional[threading.Event] = None):
        """Answer the last user message. Returns (text, ChatStats).

        Args:
            messages: OpenAI-style messages, string content, ending with a user turn.
            image: the conversation's image (PIL of any mode/size, or an `encode_image` result), or None.
            temperature: 0 for greedy decoding.
            budget: DRIP visual tokens for the image ('0.25', 16, 'mean:0.25'); None: an ImageTokens'
                own budget, else the model's default. The stats report the budget and the kept count.
            cancel: set it (from any thread) to stop: generation ends at the next token, or never starts
                if the request is still waiting for the model; finish_reason is then "cancelled".
        """
        t0 = time.perf_counter()
        tokens, n_prompt, kwargs, ids = self._prepare(messages, image, temperature, top_p, max_new_tokens, budget)
        new_ids = self._generate(ids, kwargs, cancel)
        cancelled = cancel is not None and cancel.is_set()
        if cancelled:
            self._log_cancel(new_ids, kwargs["max_new_tokens"])
        return self._decode(new_ids), self._stats(tokens, n_prompt, new_ids, kwargs["max_new_tokens"], t0, cancelled)

    def stream(self, messages: Sequence[dict], image: "Image.Image | ImageTokens | None" = None,
               temperature: float = 0.2, top_p: float = 0.7, max_new_tokens: int = 128,
               budget: BudgetLike = None) -> "ChatStream":
        """Like `chat`, but returns a ChatStream: iterate it for text pieces, then read `.stats`.

        Input errors (a bad budget included) raise here, before any generation starts.
        """
        t0 = time.perf_counter()
        tokens, n_prompt, kwargs, ids = self._prepare(messages, image, temperature, top_p, max_new_tokens, budget)
        return ChatStream(self, ids, kwargs, lambda new_ids, cancelled: self._stats(
            tokens, n_prompt, new_ids, kwargs["max_new_tokens"], t0, cancelled))


class _CancelCriteria(StoppingCriteria):
    """Ends generation at the next token once an event is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kw):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatStream:
    """Text pieces of one answer as generate produces them (generate runs in a worker thread).

    `close()` (or leaving a `with` block) stops generation early, e.g. when an HTTP client goes away.
    """

    def __init__(self, engine: ChatEngine, ids: torch.Tensor, kwargs: dict, make_stats):
        from transformers import TextIteratorStreamer
        self._cancel = threading.Event()
        self._stop_hit = False  # the template's stop string ended the answer: a normal stop, not a cancel
        # generate gets inputs_embeds, so its first put() is an empty prompt: skip_prompt drops it
        self._streamer = TextIteratorStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._engine, self._make_stats = engine, make_stats
        self._error: Optional[BaseException] = None
        self._new_ids: Optional[torch.Tensor] = None
        self.text = ""
        self.stats: Optional[ChatStats] = None
        kwargs = dict(kwargs, streamer=self._streamer)
        self._thread = threading.Thread(target=self._run, args=(ids, kwargs), daemon=True)
        self._thread.start()

    def _run(self, ids, kwargs):
        try:
            self._new_ids = self._engine._generate(ids, kwargs, self._cancel)
            if not self._new_ids.numel():  # cancelled before generate started: nothing will end the streamer
                self._streamer.end()
            if self._cancel.is_set() and not self._stop_hit:  # here: the consumer may never read the stats
                self._engine._log_cancel(self._new_ids, kwargs["max_new_tokens"])
        except BaseException as e:  # handed to the consumer thread, which re-raises it
            self._error = e
            self._streamer.end()

    def __iter__(self) -> Iterator[str]:
        stop = get_conv_template(self._engine.conv_template).stop_str.strip()
        drained = False
        try:
            for piece in self._streamer:
                if not piece:
                    continue
                if stop and stop in self.text + piece:  # a template whose stop string is plain text
                    piece = (self.text + piece)[:(self.text + piece).index(stop)][len(self.text):]
                    self._stop_hit = True
                    if piece:
                        self.text += piece
                        yield piece
                    break
                self.text += piece
                yield piece
            drained = True
        finally:
            if not drained:  # the consumer dropped the iterator (or a stop string hit): stop generating
                self.close()
        self._thread.join()
        if self._error is not None:
            raise self._error
        new_ids = self._new_ids if self._new_ids is not None else torch.zeros(0, dtype=torch.long)
        self.stats = self._make_stats(new_ids, self._cancel.is_set() and not self._stop_hit)
        self.text = self._engine._decode(new_ids) if not self._cancel.is_set() else self.text.strip()

    def close(self):
        """Stop generating (at the next token; at once if still waiting for the model). Idempotent."""
        self._cancel.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        self._thread.join()


__all__ = ["Cancelled", "ChatEngine", "ChatStats", "ChatStream", "ImageTokens", "MessageError", "budget_text",
           "visual_token_summary", "validate_messages"]

"""ChatEngine on the tiny model: answers with and without an image, token stats, multi-turn, streaming,
and DRIP token budgets (exact ratio / count, calibrated mean)."""
import threading
import time

import pytest
import torch
from PIL import Image
from tiny_model import tiny_engine, tiny_llava  # noqa: F401  (fixtures)

from llava_drip.data.shapes import Scene, render, rng_for
from llava_drip.mm_utils import process_images, tokenizer_image_token
from llava_drip.serve.engine import ChatEngine, validate_messages, visual_token_summary

Q = "What color are the shapes in the image?"


@pytest.fixture(scope="module")
def shapes_image() -> Image.Image:
    return render(Scene("square", "green", "large", "left", 2, "dots"), rng_for(0, 1000, 7), image_size=96)


@pytest.fixture(scope="module")
def scenes() -> list:
    """Images from plain to busy, so the calibrated cut keeps different counts for them."""
    drawn = [render(Scene(shape, color, size, pos, n, bg), rng_for(0, 1000, i), image_size=96)
             for i, (shape, color, size, pos, n, bg) in enumerate([
                 ("circle", "red", "small", "left", 1, "plain"), ("hexagon", "black", "large", "bottom", 1, "noise"),
                 ("star", "blue", "large", "center", 3, "stripes"), ("square", "green", "large", "left", 2, "dots")])]
    return drawn + [Image.new("RGB", (96, 96), "white")]


@pytest.fixture
def projector_lengths(tiny_engine):
    """Visual tokens the projector receives inside generate (what the LLM really reads), one entry per call."""
    seen = []
    hook = tiny_engine.model.get_model().mm_projector.register_forward_hook(
        lambda module, args, out: seen.append(int(args[0].shape[0])))
    yield seen
    hook.remove()


def _user(text):
    return [{"role": "user", "content": text}]


def test_answer_with_image_reports_tower_counts(tiny_engine, shapes_image):
    text, stats = tiny_engine.chat(_user(Q), shapes_image, temperature=0, max_new_tokens=12)
    assert isinstance(text, str)
    assert 1 <= stats.generated_tokens <= 12
    tower = tiny_engine.vision_tower
    pixels = process_images([shapes_image], tiny_engine.image_processor, tiny_engine.model.config)
    kept = len(tower(pixels)[0])
    assert stats.visual_tokens_in == tower.num_patches
    assert stats.visual_tokens_out == kept
    assert 1 <= stats.visual_tokens_out <= stats.visual_tokens_in
    assert stats.visual_ratio == pytest.approx(kept / tower.num_patches)
    # prompt tokens = text tokens with the <image> sentinel replaced by the kept visual tokens
    ids = tokenizer_image_token(tiny_engine.render_prompt(validate_messages(_user(Q)), True), tiny_engine.tokenizer)
    assert stats.prompt_tokens == len(ids) - 1 + kept
    assert stats.latency_s > 0 and stats.finish_reason in ("stop", "length")


def test_text_only_turn(tiny_engine):
    text, stats = tiny_engine.chat(_user("Hello, what can you do?"), None, temperature=0, max_new_tokens=8)
    assert isinstance(text, str) and stats.generated_tokens >= 1
    assert (stats.visual_tokens_in, stats.visual_tokens_out, stats.visual_ratio) == (0, 0, 0.0)
    prompt = tiny_engine.render_prompt(validate_messages(_user("Hello, what can you do?")), False)
    assert "<image>" not in prompt
    assert stats.prompt_tokens == len(tokenizer_image_token(prompt, tiny_engine.tokenizer))


def test_multi_turn_keeps_image_in_first_turn(tiny_engine, shapes_image):
    first, s1 = tiny_engine.chat(_user(Q), shapes_image, temperature=0, max_new_tokens=8)
    history = _user(Q) + [{"role": "assistant", "content": first}] + _user("Where are the <image> squares?")
    second, s2 = tiny_engine.chat(history, shapes_image, temperature=0, max_new_tokens=8)
    assert isinstance(second, str) and s2.generated_tokens >= 1
    assert s2.visual_tokens_out == s1.visual_tokens_out and s2.prompt_tokens > s1.prompt_tokens
    prompt = tiny_engine.render_prompt(validate_messages(history), True)
    assert prompt.count("<image>") == 1  # a stray marker in a later turn is dropped
    assert prompt.index("<image>") < prompt.index("ASSISTANT:")


def test_stream_matches_greedy_chat(tiny_engine, shapes_image):
    text, stats = tiny_engine.chat(_user(Q), shapes_image, temperature=0, max_new_tokens=12)
    stream = tiny_engine.stream(_user(Q), shapes_image, temperature=0, max_new_tokens=12)
    pieces = list(stream)
    assert "".join(pieces).strip() == text == stream.text
    assert (stream.stats.generated_tokens, stream.stats.prompt_tokens, stream.stats.visual_tokens_out) == \
        (stats.generated_tokens, stats.prompt_tokens, stats.visual_tokens_out)


@pytest.mark.parametrize("mode,size", [("RGBA", (120, 40)), ("L", (33, 90)), ("P", (64, 64)), ("I;16", (50, 70)),
                                       ("CMYK", (200, 100))])
def test_any_image_mode_and_size(tiny_engine, mode, size):
    image = Image.new(mode, size)
    tokens = tiny_engine.encode_image(image)
    side = tiny_engine.image_processor.crop_size["height"]
    assert tokens.pixel_values.shape == (1, 3, side, side)
    assert 1 <= tokens.tokens_out <= tokens.tokens_in
    _, stats = tiny_engine.chat(_user("Describe the image."), tokens, temperature=0, max_new_tokens=2)
    assert stats.visual_tokens_out == tokens.tokens_out


def test_long_conversation_drops_middle_turns(tiny_engine, shapes_image):
    filler = "tell me more about the picture and its colours " * 4
    history = _user(Q)
    for _ in range(12):
        history += [{"role": "assistant", "content": filler}] + _user(filler)
    _, stats = tiny_engine.chat(history, shapes_image, temperature=0, max_new_tokens=4)
    assert stats.prompt_tokens <= tiny_engine.max_prompt_tokens
    assert stats.visual_tokens_out >= 1
    image = tiny_engine.encode_image(shapes_image)
    assert stats.prompt_tokens == _fit_one_exchange_at_a_time(tiny_engine, validate_messages(history), image)[1]


def test_bad_conversations_raise(tiny_engine):
    with pytest.raises(ValueError, match="empty"):
        tiny_engine.chat([], None)
    with pytest.raises(ValueError, match="last message"):
        tiny_engine.chat(_user("hi") + [{"role": "assistant", "content": "yo"}], None)
    with pytest.raises(ValueError, match="alternate"):
        tiny_engine.chat(_user("a") + _user("b"), None)
    with pytest.raises(ValueError, match="role"):
        tiny_engine.chat([{"role": "tool", "content": "x"}], None)
    with pytest.raises(ValueError, match="temperature"):
        tiny_engine.chat(_user("hi"), None, temperature=-1)


def test_concurrent_requests_are_serialised(tiny_engine, shapes_image):
    expected = tiny_engine.chat(_user(Q), shapes_image, temperature=0, max_new_tokens=6)[0]
    results = []

    def worker():
        results.append(tiny_engine.chat(_user(Q), shapes_image, temperature=0, max_new_tokens=6)[0])

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 3


def test_sampling_runs(tiny_engine, shapes_image):
    torch.manual_seed(0)
    text, stats = tiny_engine.chat(_user(Q), shapes_image, temperature=0.9, top_p=0.9, max_new_tokens=6)
    assert isinstance(text, str) and 1 <= stats.generated_tokens <= 6


def test_visual_token_summary():
    assert visual_token_summary(64, 14) == "DRIP kept 14 of 64 visual tokens (4.6x fewer)"
    assert visual_token_summary(64, 64) == "DRIP kept 64 of 64 visual tokens (no reduction)"


def test_visual_token_summary_with_budget():
    assert visual_token_summary(64, 16, "0.25") == "DRIP kept 16 of 64 visual tokens (4.0x fewer); budget: 0.25"


# ---- token budgets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.25, 0.5, 1.0, "0.25"])
def test_ratio_budget_is_exact_for_every_image(tiny_engine, scenes, ratio):
    n = tiny_engine.vision_tower.num_patches
    for image in scenes:
        tokens = tiny_engine.encode_image(image, budget=ratio)
        assert (tokens.tokens_in, tokens.tokens_out) == (n, round(float(ratio) * n))
        assert tokens.budget == {1.0: "1.0"}.get(float(ratio), f"{float(ratio):g}")  # '1' would be a count


@pytest.mark.parametrize("count", [1, 5, 16, "16", 64])
def test_count_budget_is_exact_for_every_image(tiny_engine, scenes, count):
    for image in scenes:
        tokens = tiny_engine.encode_image(image, budget=count)
        assert tokens.tokens_out == int(count) and tokens.budget == str(int(count))


def test_counts_follow_the_image_at_the_default_and_at_a_mean(tiny_engine, scenes):
    assert "mean" in tiny_engine.budget_kinds  # the fixture's tower is calibrated
    default = [tiny_engine.encode_image(im).tokens_out for im in scenes]
    mean = {r: [tiny_engine.encode_image(im, budget=f"mean:{r}").tokens_out for im in scenes] for r in (0.1, 0.25, 0.5)}
    assert len(set(default)) > 1, default
    assert len(set(mean[0.25])) > 1, mean
    # a higher mean lowers the cut: no image loses tokens
    assert all(a <= b <= c for a, b, c in zip(mean[0.1], mean[0.25], mean[0.5])), mean
    assert sum(mean[0.1]) < sum(mean[0.5])
    assert tiny_engine.encode_image(scenes[0]).budget is None
    assert tiny_engine.budget_label(None) == f"model default ({tiny_engine.default_budget})"


@pytest.mark.parametrize("budget,shown", [(None, None), ("0.5", "0.5"), (8, "8"), ("mean:0.1", "mean:0.1"),
                                          (1.0, "1.0")])
def test_chat_reports_the_budget_generate_used(tiny_engine, shapes_image, projector_lengths, budget, shown):
    text, stats = tiny_engine.chat(_user(Q), shapes_image, temperature=0, max_new_tokens=4, budget=budget)
    expected = tiny_engine.encode_image(shapes_image, budget)
    assert stats.budget == expected.budget == shown
    assert stats.visual_tokens_out == expected.tokens_out
    assert projector_lengths == [stats.visual_tokens_out]  # generate encoded the image at the same budget
    ids = tokenizer_image_token(tiny_engine.render_prompt(validate_messages(_user(Q)), True), tiny_engine.tokenizer)
    assert stats.prompt_tokens == len(ids) - 1 + stats.visual_tokens_out
    assert stats.to_dict()["budget"] == stats.budget
    stream = tiny_engine.stream(_user(Q), shapes_image, temperature=0, max_new_tokens=4, budget=budget)
    assert "".join(stream).strip() == text
    assert (stream.stats.visual_tokens_out, stream.stats.budget) == (stats.visual_tokens_out, stats.budget)
    assert projector_lengths == [stats.visual_tokens_out] * 2


def test_image_tokens_keep_their_budget(tiny_engine, shapes_image, projector_lengths):
    tokens = tiny_engine.encode_image(shapes_image, budget="0.5")
    _, stats = tiny_engine.chat(_user(Q), tokens, temperature=0, max_new_tokens=2)  # no budget: the image's own
    assert (stats.visual_tokens_out, stats.budget) == (32, "0.5")
    _, stats = tiny_engine.chat(_user(Q), tokens, temperature=0, max_new_tokens=2, budget=8)  # re-counted
    assert (stats.visual_tokens_out, stats.budget) == (8, "8")
    assert projector_lengths == [32, 8]


@pytest.mark.parametrize("budget,needle", [("abc", "invalid budget"), ("0", "whole number"), (0, "whole number"),
                                           (1.5, r"\(0, 1\]"), ("mean:2", r"\(0, 1\]"), ("mean:x", "invalid budget"),
                                           (65, "64 patches"), (True, "invalid budget")])
def test_bad_budgets_raise(tiny_engine, shapes_image, budget, needle):
    with pytest.raises(ValueError, match=needle):
        tiny_engine.encode_image(shapes_image, budget=budget)
    with pytest.raises(ValueError, match=needle):
        tiny_engine.chat(_user(Q), shapes_image, budget=budget)
    with pytest.raises(ValueError, match=needle):
        tiny_engine.stream(_user(Q), None, budget=budget)  # checked with or without an image


def test_budget_on_a_tower_without_drip_is_a_clear_error(tiny_engine, shapes_image, monkeypatch):
    import llava_drip.drip.factory  # noqa: F401  (registers ViT-tiny with open_clip)
    from llava_drip.model.multimodal_encoder.towers import OpenCLIPVisionTower
    vit = OpenCLIPVisionTower("ViT-tiny")
    monkeypatch.setattr(ChatEngine, "vision_tower", property(lambda self: vit))
    assert tiny_engine.budget_kinds == () and tiny_engine.default_budget is None
    assert tiny_engine.resolve_budget(None) is None
    for budget in ("0.25", 16, "mean:0.25"):
        with pytest.raises(ValueError, match="needs a DRIP vision tower; this model's ViT-tiny keeps all 64 patches"):
            tiny_engine.encode_image(shapes_image, budget=budget)
        with pytest.raises(ValueError, match="needs a DRIP vision tower"):
            tiny_engine.chat(_user(Q), shapes_image, budget=budget)


def test_mean_budget_needs_calibration(tiny_engine, shapes_image):
    quantiles = tiny_engine.vision_tower.vision_tower.calib_quantiles
    saved = quantiles.clone()
    quantiles.fill_(float("nan"))  # as an uncalibrated checkpoint loads
    try:
        assert tiny_engine.budget_kinds == ("ratio", "count")
        with pytest.raises(ValueError, match="calibrated"):
            tiny_engine.encode_image(shapes_image, budget="mean:0.25")
        assert tiny_engine.encode_image(shapes_image, budget="0.25").tokens_out == 16  # fixed counts need none
    finally:
        quantiles.copy_(saved)


# ---- cost bounds: prompt fitting, character bound, cancellation ---------------------------------------
class _CountingTokenizer:
    """The engine's tokenizer, counting the characters it is asked to tokenise."""

    def __init__(self, tokenizer):
        self._tok, self.chars, self.longest = tokenizer, 0, 0

    def __call__(self, text, *args, **kwargs):
        self.chars += len(text)
        self.longest = max(self.longest, len(text))
        return self._tok(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.fixture
def counting(tiny_engine, monkeypatch):
    tok = _CountingTokenizer(tiny_engine.tokenizer)
    monkeypatch.setattr(tiny_engine, "tokenizer", tok)
    return tok


def _fit_one_exchange_at_a_time(engine, messages, image):
    """The fitting rule as first written (quadratic): drop the exchange after the first until the prompt fits."""
    visual = image.tokens_out - 1 if image is not None else 0
    head = 1 if messages[0]["role"] == "system" else 0
    while True:
        ids = tokenizer_image_token(engine.render_prompt(messages, image is not None), engine.tokenizer,
                                    return_tensors="pt")
        n = int(ids.shape[0]) + visual
        if n <= engine.max_prompt_tokens or len(messages) - head <= 3:
            return ids, n
        messages = messages[:head + 2] + messages[head + 4:]


def _conversation(rng, turns, system=False, words=("red", "square", "circle", "the", "big", ",", "?", "12",
                                                       "<image>", "shapes", "left", "colour")):
    msgs = [{"role": "system", "content": " ".join(rng.choices(words, k=rng.randint(0, 12)))}] if system else []
    for t in range(turns):
        k = rng.choice([0, 1, 3, 10, 30, 80])
        text = " ".join(rng.choices(words, k=k)) if rng.random() < 0.8 else "".join(rng.choices("ab ,.xyz", k=k))
        msgs.append({"role": "user" if t % 2 == 0 else "assistant", "content": text})
    return validate_messages(msgs)


def test_fitting_matches_dropping_one_exchange_at_a_time(tiny_engine):
    import random

    from llava_drip.serve.engine import ImageTokens
    rng = random.Random(0)
    image = ImageTokens(torch.zeros(1, 3, 8, 8), 64, 16)  # only its counts matter to fitting
    checked = 0
    for trial in range(80):
        messages = _conversation(rng, rng.choice([1, 3, 5, 9, 21, 41, 81]), system=rng.random() < 0.3)
        im = image if trial % 2 else None
        ids, n = _fit_one_exchange_at_a_time(tiny_engine, messages, im)
        if n > tiny_engine.max_prompt_tokens:  # even the always-kept part is too long: both refuse
            with pytest.raises(ValueError, match="takes at most"):
                tiny_engine._fit_prompt(messages, im, 8)
            continue
        got_ids, got_n, _ = tiny_engine._fit_prompt(messages, im, 8)
        assert got_n == n and torch.equal(got_ids[0], ids), (trial, len(messages))
        checked += 1
    assert checked > 40


def test_fitting_2001_turns_is_linear(tiny_engine, counting):
    history = _user("hi")
    for i in range(1000):
        history += [{"role": "assistant", "content": f"hello there number {i}"}] + _user("tell me more")
    total = sum(len(m["content"]) for m in history)
    ids, n, _ = tiny_engine._fit_prompt(validate_messages(history), None, 8)
    assert n <= tiny_engine.max_prompt_tokens
    prompt = tiny_engine.tokenizer.decode(ids[0])
    # each kept message about once, plus a few exact passes over the kept prompt; never the whole history
    assert counting.chars < 8 * len(prompt) < total, (counting.chars, len(prompt), total)
    assert "hello there number 999" in prompt and "hello there number 500" not in prompt  # the newest stay
    _, stats = tiny_engine.chat(history, None, temperature=0, max_new_tokens=2)
    assert stats.prompt_tokens == n


def test_huge_message_is_refused_before_tokenising(tiny_engine, counting):
    limit = tiny_engine.max_prompt_chars
    assert limit >= 4 * tiny_engine.max_prompt_tokens
    huge = "word " * (4 * 1024 * 1024 // 5)  # 4 MB
    cases = [(_user(huge), "messages[0].content"),
             ([{"role": "system", "content": huge}] + _user("hi"), "messages[0].content"),
             (_user("hi") + [{"role": "assistant", "content": "yo"}] + _user(huge), "messages[2].content")]
    for messages, param in cases:
        for call in (tiny_engine.chat, tiny_engine.stream):
            with pytest.raises(ValueError, match=r"characters; this model reads at most") as err:
                call(messages, None, max_new_tokens=2)
            assert err.value.param == param
    assert counting.chars == 0
    # a huge *middle* message is one fitting drops anyway: answered, and never tokenised
    history = _user("hi") + [{"role": "assistant", "content": "yo"}, {"role": "user", "content": huge},
                             {"role": "assistant", "content": "ok"}] + _user("and now?")
    _, stats = tiny_engine.chat(history, None, temperature=0, max_new_tokens=2)
    assert stats.prompt_tokens <= tiny_engine.max_prompt_tokens and counting.longest <= limit


def test_encode_image_reads_bytes_and_refuses_a_pixel_bomb(tiny_engine, shapes_image, tmp_path):
    import io

    from llava_drip.image_io import ImageError
    buf = io.BytesIO()
    shapes_image.save(buf, "PNG")
    assert tiny_engine.encode_image(buf.getvalue()).tokens_out == tiny_engine.encode_image(shapes_image).tokens_out
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(20000, 20000))
    with pytest.raises(ImageError, match="over the limit") as err:
        tiny_engine.encode_image(str(bomb))
    assert err.value.kind == "too_large"


def _png_header_only(w, h) -> bytes:
    """A PNG whose header claims w x h: enough for a size check that reads only the header."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture
def no_eos(tiny_engine, monkeypatch):
    """Generation runs to max_new_tokens: the tiny model otherwise stops within a few tokens, too soon
    for a cancel to be told apart from a natural end."""
    monkeypatch.setattr(tiny_engine, "_suppress_ids", tuple(tiny_engine._eos_ids))


def test_chat_cancel_stops_generation(tiny_engine, no_eos, caplog):
    cancel = threading.Event()
    timer = threading.Timer(0.3, cancel.set)
    timer.start()
    with caplog.at_level("INFO", logger="llava_drip"):
        _, stats = tiny_engine.chat(_user("Hello"), None, temperature=0, max_new_tokens=600, cancel=cancel)
    assert stats.finish_reason == "cancelled" and 1 <= stats.generated_tokens < 600
    assert _worker_goes_idle(tiny_engine)
    assert f"generation cancelled after {stats.generated_tokens} of 600 new tokens" in caplog.text
    _, stats = tiny_engine.chat(_user("Hello"), None, temperature=0, max_new_tokens=3)  # the engine is free
    assert (stats.generated_tokens, stats.finish_reason) == (3, "length")


def _worker_goes_idle(engine, timeout=30.0) -> bool:
    """The worker lets go of the model once the cancelled row is gone. A request is answered inside the
    worker's step, so the lock may still be held for the rest of that step: poll, do not sample once."""
    deadline = time.monotonic() + timeout
    while engine._lock.locked() or engine._running:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_stream_close_stops_generation(tiny_engine, no_eos, caplog):
    with caplog.at_level("INFO", logger="llava_drip"):
        stream = tiny_engine.stream(_user("Hello"), None, temperature=0, max_new_tokens=600)
        pieces = iter(stream)
        next(pieces)
        stream.close()
        rest = list(pieces)  # ends soon: generation stops at the next token
    assert stream.stats.finish_reason == "cancelled" and stream.stats.generated_tokens < 600
    assert len(rest) < 600 and _worker_goes_idle(tiny_engine)
    assert "generation cancelled after" in caplog.text


def test_cancel_while_waiting_gives_up_the_place(tiny_engine):
    cancel, result = threading.Event(), {}

    def waiter():
        result["chat"] = tiny_engine.chat(_user("Hello"), None, max_new_tokens=4, cancel=cancel)
        result["stream"] = tiny_engine.stream(_user("Hello"), None, max_new_tokens=4)

    with tiny_engine._lock:  # another request holds the model
        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.2)
        cancel.set()
        t.join(timeout=10)
        assert "chat" in result, "a cancelled request kept waiting for the model"
        stream = result["stream"]
        stream.close()  # waiting too: closing it ends it without generating
        assert list(stream) == []
    text, stats = result["chat"]
    assert (text, stats.generated_tokens, stats.finish_reason) == ("", 0, "cancelled")
    assert (stream.stats.generated_tokens, stream.stats.finish_reason) == (0, "cancelled")

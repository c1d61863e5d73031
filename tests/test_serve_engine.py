"""ChatEngine on the tiny model: answers with and without an image, token stats, multi-turn, streaming."""
import threading

import pytest
import torch
from PIL import Image
from tiny_model import tiny_engine, tiny_llava  # noqa: F401  (fixtures)

from llava_drip.data.shapes import Scene, render, rng_for
from llava_drip.mm_utils import process_images, tokenizer_image_token
from llava_drip.serve.engine import validate_messages, visual_token_summary

Q = "What color are the shapes in the image?"


@pytest.fixture(scope="module")
def shapes_image() -> Image.Image:
    return render(Scene("square", "green", "large", "left", 2, "dots"), rng_for(0, 1000, 7), image_size=96)


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

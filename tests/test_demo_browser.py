"""The Gradio demo: its callbacks called directly (budget control, answers), and the page driven in
headless Chromium: upload, ask, read the answer and the token count, move the budget slider."""
import contextlib
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
import torch
from test_cli_errors import BAD_KINDS, NEEDLE, write_bad_images
from tiny_model import tiny_engine, tiny_llava  # noqa: F401  (fixtures)

from llava_drip.serve.demo import (MAX_UPLOAD_MB, MODE_DEFAULT, MODE_EXACT, MODE_MEAN, DemoActions, budget_modes,
                                   budget_spec, build_demo, example_images, launch, model_markdown)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# LLAVA_DRIP_SCREENSHOT=docs/figures/demo.png refreshes the docs' screenshot; by default it stays in tmp
SCREENSHOT_ENV = "LLAVA_DRIP_SCREENSHOT"

browser = [pytest.mark.browser,
           pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing (apt-get install -y chromium)")]


def _browser(test):
    for mark in browser:
        test = mark(test)
    return test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return example_images(str(tmp_path_factory.mktemp("demo-examples")))


@pytest.fixture(scope="module")
def demo_url(tiny_engine, examples):
    demo = build_demo(tiny_engine, examples)
    port = _free_port()
    launch(demo, "127.0.0.1", port)  # as `llava-drip demo` starts it: the upload limit included
    yield f"http://127.0.0.1:{port}/", examples
    demo.close()


@pytest.fixture(scope="module")
def bad_uploads(tmp_path_factory):
    return write_bad_images(tmp_path_factory.mktemp("bad-uploads"))


def _kept(text: str):
    m = re.search(r"kept (\d+) of (\d+) visual tokens", text)
    assert m, text
    return int(m.group(1)), int(m.group(2))


# ---- callbacks, no browser ----------------------------------------------------------------------------
def test_budget_spec_and_modes(tiny_engine):
    assert budget_spec(MODE_DEFAULT, 0.5) is None
    assert budget_spec(MODE_EXACT, 0.25) == "0.25"
    assert budget_spec(MODE_MEAN, 0.1 + 0.2) == "mean:0.3"  # slider floats come out clean
    assert budget_spec(MODE_EXACT, 1.0) == "1.0"  # not '1', which is a count of one token
    with pytest.raises(ValueError, match="unknown budget mode"):
        budget_spec("fast", 0.5)
    assert budget_modes(tiny_engine) == [MODE_DEFAULT, MODE_EXACT, MODE_MEAN]  # the fixture's tower is calibrated


def test_budget_control_updates_count_and_map(tiny_engine, examples):
    actions = DemoActions(tiny_engine)
    image = Image.open(examples[0][0])
    text, default_map, _ = actions.show_image(image, MODE_DEFAULT, 0.25)  # untouched: the model's default
    assert _kept(text) == (tiny_engine.encode_image(image).tokens_out, 64)
    assert f"budget: model default ({tiny_engine.default_budget})" in text
    maps = {}
    for ratio in (0.05, 0.5, 1.0):
        text, maps[ratio], _ = actions.show_image(image, MODE_EXACT, ratio)
        assert _kept(text) == (round(ratio * 64), 64) and f"budget: {budget_spec(MODE_EXACT, ratio)}" in text
    assert not np.array_equal(np.asarray(maps[0.05]), np.asarray(maps[0.5]))  # the map is re-pooled too
    text, _, _ = actions.show_image(image, MODE_MEAN, 0.25)
    assert _kept(text)[0] == tiny_engine.encode_image(image, "mean:0.25").tokens_out and "budget: mean:0.25" in text
    text, _, slider, _ = actions.on_mode(image, MODE_EXACT, 0.5)
    assert _kept(text)[0] == 32 and slider["interactive"] is True
    assert actions.on_mode(image, MODE_DEFAULT, 0.5)[2]["interactive"] is False
    _, _, chat, history, _ = actions.on_image(image, MODE_EXACT, 0.5)  # a new image starts a new conversation
    assert chat == [] and history == []
    assert actions.show_image(None, MODE_EXACT, 0.5)[1] is None


def test_the_next_answer_uses_the_budget(tiny_engine, examples):
    actions = DemoActions(tiny_engine)
    image = Image.open(examples[1][0])
    seen = []
    hook = tiny_engine.model.get_model().mm_projector.register_forward_hook(
        lambda module, args, out: seen.append(int(args[0].shape[0])))
    try:
        history = [{"role": "user", "content": examples[1][1]}]
        for mode, ratio, kept in ((MODE_EXACT, 0.5, 32), (MODE_EXACT, 0.125, 8),
                                  (MODE_DEFAULT, 0.5, tiny_engine.encode_image(image).tokens_out)):
            *_, (chat, new_history, stats, _) = actions.answer(image, history, 0.0, 0.7, 4, mode, ratio)
            assert new_history[-1]["role"] == "assistant" and chat == new_history
            assert _kept(stats)[0] == kept and "generated" in stats
            assert seen[-1] == kept  # what generate fed the LLM
    finally:
        hook.remove()


def test_an_upload_is_read_and_encoded_once(tiny_engine, examples, monkeypatch):
    """Answers and budget changes reuse the upload's tokens (kept in a gr.State); only a new upload is read."""
    import llava_drip.image_io as image_io
    actions = DemoActions(tiny_engine)
    opened, encoded = [], []
    real_open, real_encode = image_io.open_image, tiny_engine.encode_image
    monkeypatch.setattr(image_io, "open_image", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    monkeypatch.setattr(tiny_engine, "encode_image", lambda *a, **k: encoded.append(a) or real_encode(*a, **k))
    path = examples[0][0]
    *_, up = actions.on_image(path, MODE_DEFAULT, 0.25, None)
    history = [{"role": "user", "content": "What color are the shapes in the image?"}]
    for _ in range(2):
        *_, (chat, history, stats, again) = actions.answer(path, history, 0.0, 0.7, 4, MODE_DEFAULT, 0.25, up)
        assert again is up and "visual" in stats
        history = history + [{"role": "user", "content": "How many shapes are there in the image?"}]
    text, _, again = actions.show_image(path, MODE_EXACT, 0.5, up)  # another budget: re-counted, not re-read
    assert _kept(text) == (32, 64) and again is up
    *_, (_, _, stats, _) = actions.answer(path, history, 0.0, 0.7, 4, MODE_EXACT, 0.5, up)
    assert "(32 visual)" in stats
    assert len(opened) == 1 and len(encoded) == 1
    *_, other = actions.on_image(examples[1][0], MODE_DEFAULT, 0.25, up)  # a new upload is read
    assert other is not up and len(opened) == 2 and len(encoded) == 2


def test_transparency_is_the_projects_to_convert(tiny_engine, tmp_path):
    """The page hands the callbacks the file as uploaded; image_io puts transparency over white (Gradio's
    RGB mode would have flattened it first, leaving the arbitrary colour under alpha 0: here black)."""
    from llava_drip.image_io import open_image
    arr = np.zeros((64, 64, 4), np.uint8)
    arr[:, 32:] = (200, 30, 30, 255)  # left half fully transparent over black
    path = tmp_path / "rgba.png"
    Image.fromarray(arr, "RGBA").save(path)
    demo = build_demo(tiny_engine)
    component = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "drip-image")
    payload = type("Payload", (), {"path": str(path), "url": None})()
    assert component.preprocess(payload) == str(path)  # undecoded
    up = DemoActions(tiny_engine).upload(component.preprocess(payload))
    white = tiny_engine.encode_image(open_image(path)).pixel_values
    flattened = tiny_engine.encode_image(Image.open(path).convert("RGB")).pixel_values
    assert torch.equal(up.tokens.pixel_values, white) and not torch.equal(white, flattened)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_unusable_upload_is_named_and_the_chat_goes_on(kind, tiny_engine, bad_uploads):
    actions = DemoActions(tiny_engine)
    path = str(bad_uploads[kind])
    with pytest.warns(UserWarning, match=re.escape(NEEDLE[kind])):  # gr.Warning outside a page
        text, viz, chat, history, up = actions.on_image(path, MODE_DEFAULT, 0.25, None)
    assert text.startswith("**Image not used: ") and os.path.basename(path) in text and NEEDLE[kind] in text
    assert viz is None and chat == history == [] and "kept" not in text
    text, _, _, again = actions.on_mode(path, MODE_EXACT, 0.5, up)  # the same upload: no second read or warning
    assert again is up and "Image not used" in text
    *_, (chat, history, stats, _) = actions.answer(path, [{"role": "user", "content": "Hello?"}], 0.0, 0.7, 4,
                                                  MODE_DEFAULT, 0.25, up)
    assert history[-1]["role"] == "assistant" and chat == history  # answered, without the image
    assert "Image not used" in stats and "generated" in stats


def test_a_failed_answer_leaves_the_chat_usable(tiny_engine):
    actions = DemoActions(tiny_engine)
    too_long = [{"role": "user", "content": "shape " * 5000}]  # over the tiny model's context
    with pytest.warns(UserWarning, match="not answered"):
        *_, (chat, history, _, _) = actions.answer(None, too_long, 0.0, 0.7, 4)
    assert chat[-1] == {"role": "assistant", "content": chat[-1]["content"]}
    assert chat[-1]["content"].startswith("(not answered: ") and history == []  # the failed turn is dropped
    *_, (chat, history, stats, _) = actions.answer(None, history + [{"role": "user", "content": "Hello?"}],
                                                  0.0, 0.7, 4)
    assert [m["role"] for m in history] == ["user", "assistant"] and "generated" in stats


def test_demo_builds_with_the_budget_control(tiny_engine):
    demo = build_demo(tiny_engine)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"drip-budget-mode", "drip-ratio", "drip-tokens", "drip-map"} <= ids


def test_demo_says_which_model(tiny_engine, tmp_path, monkeypatch):
    demo = build_demo(tiny_engine)
    shown = [b.value for b in demo.blocks.values() if getattr(b, "elem_id", None) == "drip-model"]
    assert shown == [model_markdown(tiny_engine.model_path)]  # beside the chat
    from llava_drip.train import tiny_pipeline
    monkeypatch.setattr(tiny_pipeline, "DEFAULT_CACHE", str(tmp_path / "tiny-llava"))
    builtin = model_markdown(str(tmp_path / "tiny-llava" / "stage2"))
    assert "built-in tiny" in builtin and "synthetic" in builtin and "`llava-drip demo --model-path DIR`" in builtin
    other = model_markdown("/data/checkpoints/llava-drip-4x")
    assert "llava-drip-4x" in other and "`/data/checkpoints/llava-drip-4x`" in other and "synthetic" not in other


# ---- the page in a browser ----------------------------------------------------------------------------
@contextlib.contextmanager
def _page_with_image(sync_api, url, image_path):
    """The demo page in headless Chromium (1280 wide) with `image_path` uploaded; yields (page, browser)."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.locator("input[type=file]").first.set_input_files(image_path)
        yield page, browser


@_browser
def test_demo_upload_ask_and_token_count(demo_url, tiny_engine, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, examples = demo_url
    image_path = examples[0][0]
    with _page_with_image(sync_api, url, image_path) as (page, browser):
        tokens = page.locator("#drip-tokens")
        sync_api.expect(tokens).to_contain_text("kept", timeout=60_000)
        page.locator("#question textarea").fill("What color are the shapes in the image?")
        page.locator("#send").click()
        sync_api.expect(page.locator("#chat [data-testid='user']").last).to_contain_text("What color")
        bot = page.locator("#chat [data-testid='bot']").last
        sync_api.expect(bot).not_to_be_empty(timeout=90_000)
        sync_api.expect(tokens).to_contain_text("generated", timeout=90_000)  # set when the answer is done
        answer = bot.inner_text().strip()
        stats = tokens.inner_text()
        page.locator("#drip-map img").first.wait_for(state="visible", timeout=30_000)
        shot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "demo.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert answer
    assert Image.open(shot).size[0] == 1280
    kept, total = _kept(stats)
    assert 1 <= kept <= total
    # the page shows what the tower really keeps for this image
    assert kept == tiny_engine.encode_image(Image.open(image_path)).tokens_out


@_browser
def test_demo_budget_slider(demo_url, tiny_engine):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, examples = demo_url
    image_path = examples[0][0]
    with _page_with_image(sync_api, url, image_path) as (page, browser):
        tokens = page.locator("#drip-tokens")
        sync_api.expect(tokens).to_contain_text("model default", timeout=60_000)
        default_text = tokens.inner_text()
        page.locator("#drip-map img").first.wait_for(state="visible", timeout=30_000)
        default_src = page.locator("#drip-map img").first.get_attribute("src")
        slider = page.locator("#drip-ratio input[type=range]")
        sync_api.expect(slider).to_be_disabled()  # the ratio means nothing at the model's default
        page.locator("#drip-budget-mode").get_by_label(MODE_EXACT).check()
        sync_api.expect(slider).to_be_enabled(timeout=30_000)
        slider.fill("0.5")
        sync_api.expect(tokens).to_contain_text("budget: 0.5", timeout=60_000)
        exact_text = tokens.inner_text()
        sync_api.expect(page.locator("#drip-map img").first).not_to_have_attribute("src", default_src or "",
                                                                                   timeout=30_000)
        page.locator("#question textarea").fill("What color are the shapes in the image?")
        page.locator("#send").click()
        sync_api.expect(tokens).to_contain_text("generated", timeout=90_000)  # set when the answer is done
        answer_text = tokens.inner_text()
        page.locator("#drip-budget-mode").get_by_label(MODE_MEAN).check()
        sync_api.expect(tokens).to_contain_text("budget: mean:0.5", timeout=60_000)
        mean_text = tokens.inner_text()
        browser.close()
    image = Image.open(image_path)
    assert _kept(default_text)[0] == tiny_engine.encode_image(image).tokens_out
    assert _kept(exact_text) == (32, 64)
    assert _kept(answer_text) == (32, 64) and "(32 visual)" in answer_text  # the answer used the budget
    assert _kept(mean_text)[0] == tiny_engine.encode_image(image, "mean:0.5").tokens_out


def _ask(sync_api, page, question: str = "What color are the shapes in the image?") -> str:
    """Send a question; the answer's text once the token panel shows its stats."""
    page.locator("#question textarea").fill(question)
    page.locator("#send").click()
    bot = page.locator("#chat [data-testid='bot']").last
    sync_api.expect(bot).not_to_be_empty(timeout=90_000)
    sync_api.expect(page.locator("#drip-tokens")).to_contain_text("generated", timeout=90_000)
    return bot.inner_text().strip()


@_browser
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_demo_unusable_upload(kind, demo_url, bad_uploads):
    """A good image, then one that cannot be used: one line names the problem (toast and token panel), the
    old count is gone, no "Error" badge, and the next question is answered."""
    sync_api = pytest.importorskip("playwright.sync_api")
    url, examples = demo_url
    bad = bad_uploads[kind]
    with _page_with_image(sync_api, url, examples[0][0]) as (page, browser):
        tokens = page.locator("#drip-tokens")
        sync_api.expect(tokens).to_contain_text("kept", timeout=60_000)
        page.locator("input[type=file]").first.set_input_files(str(bad))
        sync_api.expect(tokens).to_contain_text("Image not used", timeout=60_000)
        panel = tokens.inner_text()
        toast = page.locator(".toast-body").filter(has_text=NEEDLE[kind])
        sync_api.expect(toast).to_be_visible(timeout=30_000)
        answer = _ask(sync_api, page)
        after = tokens.inner_text()
        errors = page.get_by_text("Error", exact=True).count()
        browser.close()
    assert bad.name in panel and NEEDLE[kind] in panel and "kept" not in panel  # not the previous image's count
    assert answer and "Image not used" in after and "visual)" not in after  # answered, without an image
    assert errors == 0


@_browser
def test_demo_upload_over_the_size_limit(demo_url, tmp_path):
    """Gradio refuses an upload over MAX_UPLOAD_MB (the API's body limit) before it is stored, naming it."""
    sync_api = pytest.importorskip("playwright.sync_api")
    url, examples = demo_url
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(int((MAX_UPLOAD_MB + 1) * 1e6))
    with _page_with_image(sync_api, url, examples[0][0]) as (page, browser):
        tokens = page.locator("#drip-tokens")
        sync_api.expect(tokens).to_contain_text("kept", timeout=60_000)
        page.locator("input[type=file]").first.set_input_files(str(big))
        toast = page.locator(".toast-body").filter(has_text="maximum allowed size")
        sync_api.expect(toast).to_be_visible(timeout=30_000)
        text = toast.inner_text()
        answer = _ask(sync_api, page)
        browser.close()
    assert "big.png" in text and answer

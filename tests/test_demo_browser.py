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
from tiny_model import tiny_engine, tiny_llava  # noqa: F401  (fixtures)

from llava_drip.serve.demo import (MODE_DEFAULT, MODE_EXACT, MODE_MEAN, DemoActions, budget_modes, budget_spec,
                                   build_demo, example_images, model_markdown)

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
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", examples
    demo.close()


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
    text, default_map = actions.show_image(image, MODE_DEFAULT, 0.25)  # untouched: the model's default
    assert _kept(text) == (tiny_engine.encode_image(image).tokens_out, 64)
    assert f"budget: model default ({tiny_engine.default_budget})" in text
    maps = {}
    for ratio in (0.05, 0.5, 1.0):
        text, maps[ratio] = actions.show_image(image, MODE_EXACT, ratio)
        assert _kept(text) == (round(ratio * 64), 64) and f"budget: {budget_spec(MODE_EXACT, ratio)}" in text
    assert not np.array_equal(np.asarray(maps[0.05]), np.asarray(maps[0.5]))  # the map is re-pooled too
    text, _ = actions.show_image(image, MODE_MEAN, 0.25)
    assert _kept(text)[0] == tiny_engine.encode_image(image, "mean:0.25").tokens_out and "budget: mean:0.25" in text
    text, _, slider = actions.on_mode(image, MODE_EXACT, 0.5)
    assert _kept(text)[0] == 32 and slider["interactive"] is True
    assert actions.on_mode(image, MODE_DEFAULT, 0.5)[2]["interactive"] is False
    *_, chat, history = actions.on_image(image, MODE_EXACT, 0.5)  # a new image starts a new conversation
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
            *_, (chat, new_history, stats) = actions.answer(image, history, 0.0, 0.7, 4, mode, ratio)
            assert new_history[-1]["role"] == "assistant" and chat == new_history
            assert _kept(stats)[0] == kept and "generated" in stats
            assert seen[-1] == kept  # what generate fed the LLM
    finally:
        hook.remove()


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

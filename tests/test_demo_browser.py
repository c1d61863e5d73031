"""Drive the Gradio demo in headless Chromium: upload, ask, read the answer and the token count."""
import os
import re
import socket
from pathlib import Path

import pytest
from PIL import Image
from tiny_model import tiny_engine, tiny_llava  # noqa: F401  (fixtures)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# LLAVA_DRIP_SCREENSHOT=docs/figures/demo.png refreshes the docs' screenshot; by default it stays in tmp
SCREENSHOT_ENV = "LLAVA_DRIP_SCREENSHOT"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing (apt-get install -y chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(tiny_engine, tmp_path_factory):
    from llava_drip.serve.demo import build_demo, example_images
    examples = example_images(str(tmp_path_factory.mktemp("demo-examples")))
    demo = build_demo(tiny_engine, examples)
    port = _free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", examples
    demo.close()


def test_demo_upload_ask_and_token_count(demo_url, tiny_engine, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, examples = demo_url
    image_path = examples[0][0]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.locator("input[type=file]").first.set_input_files(image_path)
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
    m = re.search(r"kept (\d+) of (\d+) visual tokens", stats)
    assert m, stats
    kept, total = int(m.group(1)), int(m.group(2))
    assert 1 <= kept <= total
    # the page shows what the tower really keeps for this image
    assert kept == tiny_engine.encode_image(Image.open(image_path)).tokens_out

"""The demo in a real browser: headless Chromium (Debian's, driven by Playwright) opens the page,
uploads an image, asks a question, sees the model's answer, asks for grounding and sees the box
drawn where the model put it. The page's requests never leave this machine. A screenshot is saved
in tests/artifacts/."""

from __future__ import annotations

import io
import shutil
import socket
from pathlib import Path

import pytest
from serve_helpers import circle_image, grounding_model, torch_threads

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium on PATH (apt-get install chromium); .ci/run installs it"
)
ARTIFACTS = Path(__file__).parent / "artifacts"
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCAL = ("http://127.0.0.1", "data:", "blob:")
TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def demo_url():
    from tinygptv.serve.demo import create_demo, launch_demo

    with torch_threads(1):
        model = grounding_model()
        demo = create_demo(model)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        _, url, _ = launch_demo(demo, port=port, prevent_thread_lock=True, quiet=True)
        try:
            yield url, model
        finally:
            demo.close()


def test_upload_ask_and_see_the_grounding_box(demo_url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (test extra)")
    from PIL import Image

    url, model = demo_url
    image_file = tmp_path / "circle.png"
    circle_image().save(image_file)
    expected = model.ask(circle_image(), "what color is the circle ?", max_new_tokens=128).text
    left_the_machine: list[str] = []

    def only_local(route):
        if route.request.url.startswith(LOCAL):
            route.continue_()
        else:
            left_the_machine.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 960})
            page.set_default_timeout(TIMEOUT_MS)
            page.route("**/*", only_local)
            page.goto(url)
            # 1. upload the image
            page.set_input_files("#image-input input[type=file]", str(image_file))
            page.wait_for_selector("#image-input img")
            # 2. ask a question: the model's answer appears in the chat
            page.fill("#question textarea", "what color is the circle ?")
            page.click("#ask-button")
            bot = page.get_by_test_id("bot")
            bot.last.wait_for()
            page.wait_for_function(
                "t => document.querySelector('#chatbot [data-testid=bot]')?.innerText.trim() === t", arg=expected
            )
            assert bot.last.inner_text().strip() == expected == "red"
            # 3. a new conversation about the same image, with the grounding button
            page.click("#clear-button")
            bot.first.wait_for(state="detached")
            page.fill("#question textarea", "describe the image")
            page.click("#task-grounding")
            legend = page.locator("#boxes .legend-item")
            legend.first.wait_for()
            assert legend.all_inner_texts() == ["red circle"]
            assert page.get_by_test_id("bot").last.inner_text().strip() == "<p>red circle</p> {<10><20><60><70>}"
            # 4. the drawn box is where the model put it: (10, 20, 60, 70) of 224 px = (22, 45)-(134, 157)
            mask_url = page.locator("#boxes img.mask").first.get_attribute("src")
            mask = Image.open(io.BytesIO(page.request.get(mask_url).body())).getchannel("A")
            assert mask.size == (224, 224)
            assert mask.getpixel((23, 100)) == 255 and mask.getpixel((132, 100)) == 255  # left and right edges
            assert mask.getpixel((80, 46)) == 255 and mask.getpixel((80, 155)) == 255  # top and bottom edges
            assert 0 < mask.getpixel((80, 100)) < 255  # inside: shaded
            assert mask.getpixel((10, 10)) == 0 and mask.getpixel((200, 200)) == 0  # outside: clear
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "demo_grounding.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    assert left_the_machine == []

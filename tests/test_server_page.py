"""The web page in a real headless Chromium (Debian's package, driven by playwright-python): type a prompt,
generate, wait for the image and check the parameters it carries; an error shows in the page. Without
/usr/bin/chromium the test is skipped with that reason (CI installs it: .ci/run)."""

import base64
import io
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from latentdiff.infotext import parse_parameters
from latentdiff.pipeline import Pipeline
from latentdiff.resources import demo_model
from latentdiff.server.app import ServerConfig, create_app
from latentdiff.server.command import Background
from latentdiff.server.schema import Caps

CHROMIUM = os.environ.get("LATENTDIFF_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
# where `LATENTDIFF_SCREENSHOT=1 pytest tests/test_server_page.py` refreshes the README's picture
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "server-page.png"

pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"no Chromium at {CHROMIUM}: install Debian's "
                                "chromium package (apt-get install -y chromium; .ci/run does) to run the page test")


@pytest.fixture(scope="module")
def server():
    pipeline = Pipeline.from_pretrained(demo_model(), threads=1)
    running = Background(create_app(ServerConfig(model=demo_model(), caps=Caps(max_steps=1000)), pipeline=pipeline))
    yield running
    running.stop()


@pytest.fixture
def page(tmp_path):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                       args=ARGS, headless=True, viewport={"width": 1100,
                                                                                           "height": 760})
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_type_a_prompt_generate_and_read_the_parameters(server, page):
    page.goto(server.url)
    page.wait_for_selector("#sampler_name option[value='DPM++ 2M']", state="attached")
    page.fill("#prompt", "a big red circle on a blue background")
    page.fill("#steps", "12")
    page.fill("#seed", "7")
    page.fill("#batch_size", "2")
    page.select_option("#sampler_name", "DPM++ 2M")
    page.select_option("#scheduler", "karras")
    page.click("#generate")
    page.wait_for_selector("#gallery figure:nth-child(2) img.result", timeout=60_000)
    assert page.is_visible("#error") is False
    sources = page.eval_on_selector_all("#gallery img.result", "imgs => imgs.map(i => i.src)")
    seeds = []
    for src in sources:
        image = Image.open(io.BytesIO(base64.b64decode(src.partition(",")[2])))
        info = parse_parameters(image.info["parameters"])
        assert info.prompt == "a big red circle on a blue background"
        assert info.params["Steps"] == "12" and info.params["Sampler"] == "DPM++ 2M"
        assert info.params["Schedule type"] == "Karras" and info.params["Size"] == "64x64"
        seeds.append(info.params["Seed"])
    assert seeds == ["7", "8"]  # the batch in order
    assert page.inner_text("#gallery figure figcaption").startswith("a big red circle")
    assert page.get_attribute("#gallery figure a", "download").endswith(".png")
    if os.environ.get("LATENTDIFF_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_img2img_upload_and_errors_show_in_the_page(server, page, tmp_path):
    start = tmp_path / "start.png"
    Image.new("RGB", (64, 64), (20, 200, 20)).save(start)
    page.goto(server.url)
    page.wait_for_selector("#sampler_name option", state="attached")
    page.fill("#prompt", "a yellow star")
    page.fill("#steps", "8")
    page.fill("#width", "100")  # not a multiple of 16: the server's 422 message shows
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert "width 100" in page.inner_text("#error") and "multiple of 16" in page.inner_text("#error")
    page.fill("#width", "")
    page.set_input_files("#init_image", str(start))
    page.fill("#denoising_strength", "0.5")
    page.click("#generate")
    page.wait_for_selector("#gallery img.result", timeout=60_000)
    src = page.get_attribute("#gallery img.result", "src")
    info = parse_parameters(Image.open(io.BytesIO(base64.b64decode(src.partition(",")[2]))).info["parameters"])
    assert info.params["Denoising strength"] == "0.5" and info.prompt == "a yellow star"
    assert page.is_hidden("#error")


def test_interrupt_button_stops_a_long_job(server, page):
    page.goto(server.url)
    page.wait_for_selector("#sampler_name option", state="attached")
    page.fill("#prompt", "a circle")
    page.fill("#steps", "1000")
    page.click("#generate")
    page.wait_for_function("document.getElementById('progress').value > 0", timeout=30_000)
    page.click("#interrupt")
    page.wait_for_selector("#gallery img.result", timeout=30_000)
    assert "interrupted" not in page.inner_text("#error")
    assert "Steps: 1000" in page.inner_text("#gallery figcaption")

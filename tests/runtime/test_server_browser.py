"""The kiosk page in a real headless browser (Debian's chromium driven by Selenium through
chromedriver): upload an image, see its caption, ask a question, search the gallery, take a picture
with the (fake) camera. Skips, saying why, where the browser or the driver is not installed."""
import shutil
from pathlib import Path

import pytest

pytest.importorskip("starlette")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from test_server import Served, encode, photo

import edgerun
from edgerun.runtime import index as ix
from edgerun.runtime.server.app import create_app
from edgerun.runtime.server.config import ServerConfig

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, DRIVER) if not Path(p).exists()]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    except WebDriverException as exc:  # a browser that cannot start here (no display libraries, ...): say why
        pytest.skip(f"chromium could not be started: {str(exc).splitlines()[0]}")
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def kiosk(blip_bundle, vqa_bundle, zoo_export, tmp_path_factory):
    _, report, model = zoo_export
    photos = tmp_path_factory.mktemp("kiosk-photos")
    for colour in ("red", "green", "blue"):
        (photos / f"{colour}.png").write_bytes(encode(photo(colour, 120)))
    index = tmp_path_factory.mktemp("kiosk-index") / "gallery"
    ix.build_index(model, [photos], output=index, thumbnails=64)
    app = create_app([blip_bundle, vqa_bundle, report.path], ServerConfig(threads=1), index=index)
    with Served(app) as served:
        yield served, photos


def text_of(browser, element_id, within=30):
    """The element's text once it is neither empty nor the '…' placeholder."""
    def ready(driver):
        text = driver.find_element(By.ID, element_id).text.strip()
        return text if text and text != "…" else False

    return WebDriverWait(browser, within).until(ready)


@pytest.mark.slow
def test_upload_caption_ask_search_and_camera(browser, kiosk, blip_bundle, vqa_bundle, tmp_path):
    served, _ = kiosk
    browser.get(served.url + "/")
    WebDriverWait(browser, 20).until(lambda d: "serving" in d.find_element(By.ID, "models").text)
    assert "gallery of 3" in browser.find_element(By.ID, "models").text

    picture = tmp_path / "upload.png"
    picture.write_bytes(encode(photo("red", 64)))
    browser.find_element(By.ID, "file").send_keys(str(picture))
    want = edgerun.load(blip_bundle, threads=1).caption(photo("red", 64)).text
    assert text_of(browser, "caption") == want.strip()

    browser.find_element(By.ID, "question").send_keys("what colour is it?")
    browser.find_element(By.ID, "ask").click()
    answer = edgerun.load(vqa_bundle, threads=1).answer(photo("red", 64), "what colour is it?").text
    assert text_of(browser, "answer") == answer.strip()

    browser.find_element(By.ID, "search-text").send_keys("a red picture")
    browser.find_element(By.ID, "search").click()
    WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results figure img")) == 3)
    widths = [browser.execute_script("return arguments[0].naturalWidth", img)
              for img in browser.find_elements(By.CSS_SELECTOR, "#results figure img")]
    assert widths == [64, 64, 64]  # the index's thumbnails, decoded by the browser
    names = {f.text.split(" · ")[0] for f in browser.find_elements(By.CSS_SELECTOR, "#results figcaption")}
    assert names == {"red.png", "green.png", "blue.png"}

    browser.find_element(By.ID, "camera-start").click()
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("return document.getElementById('video').videoWidth") > 0)
    browser.execute_script("document.getElementById('caption').textContent = ''")
    browser.find_element(By.ID, "camera-capture").click()
    assert text_of(browser, "caption")  # a caption of the fake camera's frame
    assert browser.find_element(By.ID, "camera").get_attribute("hidden") is not None
    assert browser.find_element(By.ID, "status").text == ""
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]

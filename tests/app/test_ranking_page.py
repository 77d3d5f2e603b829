"""The ranking page in a real browser: Debian's chromium, headless, driven through chromium-driver
by selenium (nothing downloads a browser). A person opens /rank with their key, orders a served
group's answers, submits, and the ranking is on the Redis stream; then the page shows the next
unranked group. A screenshot of the page is kept in the test's tmp folder."""

from __future__ import annotations

import json
import shutil

import pytest

from flywheel.app.serve import build_server
from flywheel.config import FlywheelConfig
from flywheel.contracts.keys import RANKINGS_STREAM
from flywheel.redis_server import RedisServer, free_port
from flywheel.v1 import inference_pb2 as pb
from flywheel.v1 import inference_pb2_grpc as rpc

from support.auth import API_KEYS, CLIENT_KEY, CLIENT_NAME, keyed_channel

webdriver = pytest.importorskip("selenium.webdriver", reason="the dev extra installs selenium")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")


@pytest.fixture
def platform(tiny_model_dir, tmp_path):
    redis_server = RedisServer(tmp_path / "redis").start()
    settings = FlywheelConfig.load({
        "model": str(tiny_model_dir), "grpc_address": "127.0.0.1:0", "metrics_port": 0, "dtype": "float32",
        "data_dir": str(tmp_path), "api_keys": API_KEYS, "redis_url": redis_server.url, "http_port": free_port(),
    }, environ={})
    server, release = build_server(settings)
    server.start(wait_until_ready=True)
    yield server, redis_server
    server.stop(grace=1)
    release()
    redis_server.stop(kill=True)


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1200"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def serve_group(server, prompt: str) -> pb.CompleteResponse:
    with keyed_channel(f"127.0.0.1:{server.port}") as channel:
        return rpc.InferenceStub(channel).Complete(pb.CompleteRequest(
            messages=[pb.ChatMessage(role="user", content=prompt)], n=3, max_new_tokens=6, min_new_tokens=2),
            timeout=30)


def test_a_person_ranks_a_group_in_the_browser(platform, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as until
    from selenium.webdriver.support.ui import WebDriverWait

    import redis

    server, redis_server = platform
    older = serve_group(server, "First question")
    newer = serve_group(server, "Second question")
    wait = WebDriverWait(browser, 30)

    browser.get(f"http://127.0.0.1:{server.http_port}/rank")
    browser.find_element(By.ID, "key").send_keys(CLIENT_KEY)
    browser.find_element(By.ID, "start").click()
    wait.until(lambda d: d.find_element(By.ID, "work").get_attribute("data-group-id") == newer.group_id)
    assert "Second question" in browser.find_element(By.ID, "prompt").text
    answers = browser.find_elements(By.CSS_SELECTOR, ".answer")
    assert [a.get_attribute("data-completion-id") for a in answers] == [c.completion_id for c in newer.completions]

    # best first: the last answer, then the first; the remaining one becomes the worst by itself
    answers[2].click()
    answers = browser.find_elements(By.CSS_SELECTOR, ".answer")
    answers[0].click()
    places = [a.find_element(By.CSS_SELECTOR, ".place").text for a in browser.find_elements(By.CSS_SELECTOR, ".answer")]
    assert places == ["2", "3", "1"]
    browser.find_element(By.ID, "comment").send_keys("the last one is clearest")
    browser.save_screenshot(str(tmp_path / "ranking-page.png"))
    wait.until(until.element_to_be_clickable((By.ID, "submit"))).click()

    # the page moves on to the next unranked group: the older one
    wait.until(lambda d: d.find_element(By.ID, "work").get_attribute("data-group-id") == older.group_id)
    entry_id = browser.find_element(By.ID, "status").get_attribute("data-last-entry")
    assert "Saved" in browser.find_element(By.ID, "status").text
    browser.save_screenshot(str(tmp_path / "ranking-page-next.png"))

    client = redis.Redis.from_url(redis_server.url)
    try:
        [(_, raw)] = client.xrange(RANKINGS_STREAM, entry_id, entry_id)
    finally:
        client.close()
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    ids = [c.completion_id for c in newer.completions]
    assert json.loads(fields["completion_ids"]) == [ids[2], ids[0], ids[1]]
    assert (fields["group_id"], fields["source"], fields["annotator_id"]) == (newer.group_id, "human", CLIENT_NAME)
    assert fields["comment"] == "the last one is clearest"
    assert (tmp_path / "ranking-page.png").stat().st_size > 1000

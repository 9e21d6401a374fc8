"""The chat page in headless Chromium (Debian's `chromium`, which .ci/run installs), driven
by playwright: load the page, send a message, see the reply arrive in pieces."""

from __future__ import annotations

import shutil

import pytest

from llm_shard.coordinator.http import BackgroundServer, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# a non-ASCII key: the page must send its UTF-8 bytes (fetch refuses such header text)
KEY = "k3y-ключ"


@pytest.fixture(scope="module")
def server(ray_cluster, smollm2_stores):
    from llm_shard import LLM

    with LLM(str(smollm2_stores["int8"].path), workers=["ram=1GiB", "ram=1GiB"],
             cache_tokens=1024) as llm:
        s = BackgroundServer(create_app(llm, model_name="smollm2-135m", api_key=KEY))
        yield s
        s.stop()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (.ci/run installs Debian's chromium with apt)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


def test_the_page_streams_a_reply(server, browser):
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    assert "llm-shard" in page.title()
    # the server demands a key: without it the page shows the server's 401 message
    page.fill("#max-tokens", "12")
    page.fill("#temperature", "0")
    page.fill("#input", "What is the capital of France?")
    page.click("#send")
    page.wait_for_selector(".msg.error", timeout=30_000)
    assert "API key" in page.inner_text(".msg.error")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.fill("#input", "What is the capital of France?")
    page.press("#input", "Enter")  # Enter sends
    reply = page.locator(".msg.assistant").last
    page.wait_for_function(
        "() => { const r = [...document.querySelectorAll('.msg.assistant')].pop();"
        " return r && r.dataset.done === 'true'; }", timeout=120_000)
    text = reply.inner_text()
    assert text.strip(), "empty reply"
    assert int(reply.get_attribute("data-chunks")) > 1, "the reply did not stream"
    assert page.locator(".msg.user").count() == 2
    # a second turn carries the history; Clear empties the log
    page.fill("#input", "And of Germany?")
    page.click("#send")
    page.wait_for_function(
        "() => document.querySelectorAll('.msg.assistant').length === 2 && "
        "[...document.querySelectorAll('.msg.assistant')].pop().dataset.done === 'true'",
        timeout=120_000)
    page.click("#clear")
    assert page.locator(".msg").count() == 0
    assert not errors, errors
    page.close()

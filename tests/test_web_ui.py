"""The chat page at / (http-api §6.3): served as configured, and driven in a real headless
Chromium (playwright with the system's browser): a streamed reply, the API key asked for once,
and the stop button ending the generation on the server.

Run the browser test on Debian/Ubuntu with `apt-get install chromium` and
`pip install playwright` (the system's Chromium is used; no `playwright install` needed);
without them it skips, saying which is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
import trio
from conftest import running_server, server_config

from bitnetd_trio.api.web import web_ui_enabled
from bitnetd_trio.config import ServerConfig

KEY = "sk-web-ui-test-0123456789"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
SCREENSHOT = Path(os.environ.get("BITNETD_WEB_UI_SCREENSHOT", "/tmp/bitnetd-chat-page.png"))


def test_web_ui_default_follows_the_listeners() -> None:
    assert web_ui_enabled(ServerConfig(listen=["127.0.0.1:8080"]))
    assert web_ui_enabled(ServerConfig(listen=["[::1]:8080"]))
    assert web_ui_enabled(ServerConfig(listen=["localhost:8080", "0.0.0.0:9000"]))
    assert not web_ui_enabled(ServerConfig(listen=["0.0.0.0:8080"]))
    assert not web_ui_enabled(ServerConfig(listen=[], unix_socket="/run/b.sock"))
    assert web_ui_enabled(ServerConfig(listen=["0.0.0.0:8080"], web_ui=True))
    assert not web_ui_enabled(ServerConfig(listen=["127.0.0.1:8080"], web_ui=False))


async def test_page_is_served_without_a_key(server_model_path: Path) -> None:
    config = server_config(server_model_path, server_api_keys=[KEY])
    async with running_server(config) as s, httpx.AsyncClient(base_url=s.url) as c:
        r = await c.get("/")
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        assert "connect-src 'self'" in r.headers["content-security-policy"]
        page = r.text
        assert "/v1/chat/completions" in page and "sessionStorage" in page
        # our own code only: nothing is fetched from elsewhere
        assert not re.search(r"""(src|href)=["']https?://""", page)
        assert (await c.head("/")).status_code == 200
        assert (await c.get("/v1/models")).status_code == 401  # the API still needs the key
    off = server_config(server_model_path, server_web_ui=False)
    async with running_server(off) as s, httpx.AsyncClient(base_url=s.url) as c:
        r = await c.get("/")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright)"
    if not (shutil.which("chromium") or os.path.exists("/usr/bin/chromium")):
        return "no Chromium on this machine (apt-get install chromium)"
    return None


def _running(base: str) -> float:
    text = httpx.get(base + "/metrics", headers={"authorization": f"Bearer {KEY}"}).text
    m = re.search(r"^bitnetd_requests_running (\S+)$", text, re.M)
    assert m, "no bitnetd_requests_running in /metrics"
    return float(m.group(1))


def _until(cond, timeout: float, what: str) -> None:
    """Poll cond() from Python: the page's CSP forbids the string evaluation that playwright's
    wait_for_function uses, and the test must run the page under its real CSP."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _drive(base: str) -> dict:
    """The whole browser session (playwright's sync API, in a worker thread)."""
    from playwright.sync_api import sync_playwright

    seen: dict = {"prompts": 0}
    with sync_playwright() as p:
        exe = shutil.which("chromium") or "/usr/bin/chromium"
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})

            def on_dialog(dialog) -> None:  # the API key prompt
                seen["prompts"] += 1
                dialog.accept(KEY)

            page.on("dialog", on_dialog)

            # The tiny random model reaches its end-of-text token within a few dozen tokens;
            # the test adds ignore_eos to the page's requests, so that a reply runs long enough
            # to be stopped. Everything else is the page's own request.
            def add_ignore_eos(route) -> None:
                body = json.loads(route.request.post_data or "{}")
                body["ignore_eos"] = True
                route.continue_(post_data=json.dumps(body))

            page.route("**/v1/chat/completions", add_ignore_eos)
            page.goto(base + "/")
            _until(lambda: page.text_content("#ctx") != "…", 15, "the model card")
            seen["model"] = page.text_content("#model")
            seen["ctx"] = page.text_content("#ctx")

            # 1. a short reply, streamed
            page.fill("#system", "You are a test.")

            def ask(text: str, temperature: str, max_tokens: str) -> None:
                for field, value in (("#temperature", temperature),
                                     ("#max_tokens", max_tokens), ("#input", text)):
                    page.fill(field, value)
                page.press("#input", "Enter")

            ask("Hello there", "0", "40")
            replies = page.locator(".msg.assistant .text")
            _until(lambda: replies.count() == 1 and page.is_enabled("#send")
                   and len(replies.first.text_content() or "") > 0, 30, "the first reply")
            seen["reply1"] = page.text_content(".msg.assistant .text")
            seen["speed"] = page.text_content("#speed")

            # 2. a long reply, stopped mid-stream
            ask("Tell me a long story", "0.8", "16000")
            _until(lambda: replies.count() == 2
                   and len(replies.nth(1).text_content() or "") > 20, 30, "the second reply")
            seen["running_before_stop"] = _running(base)
            seen["stop_enabled"] = page.is_enabled("#stop")
            page.screenshot(path=str(SCREENSHOT))
            seen["status_before_stop"] = page.text_content("#status")
            page.click("#stop", timeout=3000)
            t0 = time.monotonic()
            while _running(base) != 0 and time.monotonic() - t0 < 10:
                time.sleep(0.05)
            seen["running_after_stop"] = _running(base)
            seen["stop_seconds"] = time.monotonic() - t0
            _until(lambda: page.text_content("#status") == "stopped", 5, "'stopped'")
            seen["reply2_len"] = len(replies.nth(1).text_content() or "")
            seen["send_enabled"] = page.is_enabled("#send")
            seen["key_in_session"] = page.evaluate("sessionStorage.getItem('bitnetd.api_key')")
        finally:
            browser.close()
    return seen


async def test_chat_page_in_a_browser(server_model_path: Path) -> None:
    missing = _browser_missing()
    if missing:
        pytest.skip(f"browser test skipped: {missing}")
    config = server_config(server_model_path, server_api_keys=[KEY], model_parallel=2)
    async with running_server(config) as s:
        seen = await trio.to_thread.run_sync(_drive, s.url)
        assert s.app.engine.in_system == 0  # the daemon's own count agrees
    assert seen["model"] == s.app.model_id
    assert seen["ctx"] == "16384"
    assert seen["prompts"] == 1  # the key was asked for once, then kept for the session
    assert seen["key_in_session"] == KEY
    assert len(seen["reply1"]) > 0
    assert re.fullmatch(r"[0-9.]+ tokens/s", seen["speed"]), seen["speed"]
    assert seen["running_before_stop"] == 1 and seen["stop_enabled"]
    assert seen["running_after_stop"] == 0, seen
    assert seen["reply2_len"] > 20 and seen["send_enabled"]

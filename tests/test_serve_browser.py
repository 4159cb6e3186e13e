"""The web playground in a real browser: headless Debian Chromium (installed by `make browser`, never
downloaded by Playwright) opens the page, sends a chat message, sees the streamed answer appear (equal to
the same request through the API), the attention heatmap drawn, and saves a screenshot."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from tests._serve_util import serve

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.mark.browser
def test_playground_chat_streams_in_chromium(tokenizer, tmp_path):
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), "Debian chromium is missing: run `make browser`"
    shot = Path(os.environ.get("YUYAN_SCREENSHOT", tmp_path / "playground.png"))
    with serve(tokenizer, max_batch=4) as (base, lm, app), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('model-name').textContent.includes('tiny')")
            page.fill("#temperature", "0")
            page.dispatch_event("#temperature", "input")
            page.fill("#max_tokens", "24")
            page.fill("#input", "Hello! 你好")
            page.click("#send")
            answer = page.locator(".msg.assistant .body").last
            page.wait_for_function(
                "document.querySelector('.msg.assistant .body').textContent.length > 0", timeout=30000
            )
            page.wait_for_function("document.getElementById('stats').textContent.includes('tokens/s')")
            page.wait_for_function("!document.getElementById('send').disabled", timeout=30000)
            page.wait_for_function(
                "document.getElementById('attn-info').textContent.includes('rows: queries')", timeout=30000
            )
            text = answer.text_content()
            painted = page.evaluate("""() => { const c = document.getElementById('attn-canvas');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let red = 0; for (let i = 0; i < d.length; i += 4) if (d[i] === 255 && d[i + 1] < 250) red++;
                return red; }""")
            page.screenshot(path=str(shot))
        finally:
            browser.close()
        ref = httpx.post(
            base + "/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "Hello! 你好"}],
                "temperature": 0,
                "max_tokens": 24,
                "top_p": 1,
                "presence_penalty": 0,
                "frequency_penalty": 0,
            },
            timeout=30,
        ).json()
    assert not errors
    assert text == ref["choices"][0]["message"]["content"] and text
    assert painted > 0  # the heatmap has coloured cells
    assert all(u.startswith(base) for u in requests)  # nothing outside the server: works offline
    assert shot.stat().st_size > 10_000

"""The chat page (GET /) in a real headless browser, used as a person would: type, send, watch the answer
stream in, ask again (the conversation goes along), stop an answer half-way.

The browser is Debian's `chromium` package driven by Playwright through its executable path (Playwright's
own browser download needs a network; .ci/run installs the package). Without it the tests skip.
"""
import shutil

import openai
import pytest

from conftest import QUESTION, SYSTEM, running_server, when_idle, write_chatty_model

CHROMIUM = next(filter(None, map(shutil.which, ["chromium", "chromium-browser", "google-chrome"])), None)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium browser on this machine: install Debian's "
                                                          "`chromium` package (.ci/run does)")]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    # 2,048 positions: an answer runs long enough to be stopped half-way.
    model_dir = write_chatty_model(tmp_path_factory.mktemp("page") / "tiny-chat", tokenizer, max_seq_len=2048)
    with running_server(model_dir, tmp_path_factory.mktemp("log") / "serve.log") as (_, url):
        yield url


@pytest.fixture(scope="module")
def page(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server)
        yield page
        browser.close()


def greedy_answer(server, messages, max_tokens=None):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
    return client.chat.completions.create(model="tiny-chat", messages=messages, temperature=0,
                                          max_tokens=max_tokens).choices[0].message.content


def answers(page):
    return page.locator(".message.assistant")


def test_a_streamed_answer_then_a_second_turn_then_stop(page, server):
    page.fill("#system", SYSTEM)
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "150")
    page.fill("#input", QUESTION)
    page.press("#input", "Enter")
    # Streaming: part of the answer is on the page while the Stop button still says it is being generated.
    page.wait_for_function("""() => {
        const a = document.querySelector('.message.assistant');
        return a && a.textContent.length > 0 && !document.querySelector('#stop').disabled; }""")
    page.wait_for_function("() => document.querySelector('#stop').disabled")  # done
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    first = answers(page).nth(0).text_content()
    assert first == greedy_answer(server, messages, max_tokens=150)
    assert len(first) > 100

    # A second turn: the page sends the whole conversation; stop it once some of the answer is shown.
    page.fill("#max_tokens", "1500")
    page.fill("#input", "再来一首")
    page.click("#send")
    page.wait_for_function("() => document.querySelectorAll('.message.assistant')[1].textContent.length >= 5")
    page.click("#stop")
    page.wait_for_function("() => !document.querySelector('#send').disabled")
    second = answers(page).nth(1)
    assert "stopped" in second.get_attribute("class")
    shown = second.text_content()
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "再来一首"}]
    full = greedy_answer(server, messages, max_tokens=len(shown) + 200)
    assert full.startswith(shown) and len(shown) < len(full)
    # The server dropped the abandoned request instead of finishing it.
    idle = when_idle(server)
    assert idle["running"] == 0 and idle["finished"]["cancelled"] == 1

    # The stopped answer stays in the conversation, as it was shown.
    page.fill("#max_tokens", "60")
    page.fill("#input", "谢谢")
    page.click("#send")
    page.wait_for_function("() => document.querySelectorAll('.message.assistant').length == 3 && "
                           "document.querySelector('#stop').disabled")
    messages += [{"role": "assistant", "content": shown}, {"role": "user", "content": "谢谢"}]
    assert answers(page).nth(2).text_content() == greedy_answer(server, messages, max_tokens=60)
    assert [m.text_content() for m in page.locator(".message.user").all()] == [QUESTION, "再来一首", "谢谢"]


def test_an_error_is_shown_not_swallowed(page):
    page.click("#clear")
    page.fill("#input", "明月" * 2100)  # longer than the context
    page.click("#send")
    page.wait_for_selector(".message.assistant.error")
    assert "context length" in page.locator(".message.assistant.error").text_content()


def test_a_question_answered_with_a_tool_shows_the_call_the_result_and_the_answer(tokenizer, page):
    """serve.py's app with --tools search_poems, its model scripted to call the tool and then answer
    (test_tools.py's ScriptedScheduler): in the browser, the call, the search's real result and the answer."""
    import threading
    import uvicorn
    from benchmarks.common import free_port
    from serve import create_app
    from test_tools import CALL_TEXT, ScriptedScheduler
    scheduler = ScriptedScheduler([CALL_TEXT, "《静夜思》的作者是李白。"])
    app = create_app(scheduler, tokenizer, "tiny-tools", 1024, built_in_tools=["search_poems"])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    tab = page.context.browser.new_page()  # the module's browser, another page
    try:
        tab.set_default_timeout(TIMEOUT_MS)
        tab.goto(f"http://127.0.0.1:{port}/")
        tab.wait_for_function("() => document.querySelector('#status').textContent.includes('search_poems')")
        tab.fill("#input", "《静夜思》的作者是谁？")
        tab.press("#input", "Enter")
        tab.wait_for_function("() => !document.querySelector('#send').disabled && "
                              "document.querySelectorAll('.message.assistant').length > 0")
        call = tab.locator(".message.call").inner_text()
        assert "search_poems" in call and "静夜思" in call
        assert tab.locator(".message.result").inner_text().startswith("《静夜思》 作者：李白")
        assert tab.locator(".message.assistant").last.inner_text() == "《静夜思》的作者是李白。"
    finally:
        tab.close()
        server.should_exit = True
    second = tokenizer.decode(scheduler.prompts[1])
    assert "<tool_response>\n《静夜思》 作者：李白" in second  # the page sent the result back to the model

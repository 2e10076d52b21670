"""The server end to end on loopback: the official openai client, a real browser, load, cancel, bad input."""

import json
import shutil
import socket
import threading
import time

import pytest
import torch

from data import CharVocab
from inference import naive_generate
from sampler import SamplingConfig
from testing import missing, require
from transformer import MiniFormer, TransformerConfig

fastapi = require("fastapi")
uvicorn = require("uvicorn")
httpx = require("httpx")

from serve import create_app  # noqa: E402  (needs fastapi)

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
MODEL_NAME = "lab-test"


def tiny_model(vocab_size: int) -> MiniFormer:
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=vocab_size, context_length=32, num_layers=2, num_heads=2, embed_dim=32)
    model = MiniFormer(config).eval()
    with torch.no_grad():  # large weights: peaked distributions, no near-ties between batched and single runs
        for parameter in model.parameters():
            parameter.mul_(15)
    return model


class LiveServer:
    """uvicorn in a thread on a free loopback port."""

    def __init__(self, app):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def served():
    vocab = CharVocab(TEXT)
    model = tiny_model(vocab.size)
    live = LiveServer(create_app(model, vocab, MODEL_NAME, max_batch_size=8, block_size=4, max_tokens_limit=200))
    yield live, model, vocab
    live.stop()


def wait_idle(url: str, timeout: float = 20.0) -> dict:
    """Poll /health until nothing runs or waits; -> the last status."""
    deadline = time.monotonic() + timeout
    while True:
        status = httpx.get(f"{url}/health").json()
        if (status["running"] == 0 and status["waiting"] == 0) or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def test_health_and_page(served):
    live, _, _ = served
    status = httpx.get(f"{live.url}/health").json()
    assert status["status"] == "ok" and status["model"] == MODEL_NAME and status["blocks_used"] == 0
    page = httpx.get(f"{live.url}/").text
    assert "<textarea" in page and MODEL_NAME in page and "__PRESETS__" not in page


def test_non_streaming_equals_the_naive_loop(served):
    live, model, vocab = served
    body = {"model": MODEL_NAME, "prompt": "ROMEO:", "max_tokens": 40, "temperature": 0.9, "top_k": 5, "seed": 7}
    answer = httpx.post(f"{live.url}/v1/completions", json=body, timeout=30).json()
    expected = naive_generate(model, vocab.encode("ROMEO:"), 40, SamplingConfig(temperature=0.9, top_k=5), seed=7)
    assert answer["choices"][0]["text"] == vocab.decode(expected)
    assert answer["usage"] == {"prompt_tokens": 6, "completion_tokens": 40, "total_tokens": 46}


def test_openai_client_streams_a_completion(served):
    openai = require("openai")
    live, model, vocab = served
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused")
    stream = client.completions.create(model=MODEL_NAME, prompt="But soft", max_tokens=30, temperature=0,
                                       stream=True)
    pieces = [chunk.choices[0].text for chunk in stream]
    assert len(pieces) == 30  # one server-sent event per token
    assert "".join(pieces) == vocab.decode(naive_generate(model, vocab.encode("But soft"), 30,
                                                          SamplingConfig(temperature=0)))
    listed = client.models.list()
    assert [m.id for m in listed.data] == [MODEL_NAME]


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("top_k", 0), ("min_p", 2.0),
    ("repetition_penalty", 0), ("max_tokens", 0), ("max_tokens", 10**9), ("model", "gpt-4"),
    ("prompt", "o" * 100), ("prompt", "emoji \N{GRINNING FACE}"), ("prompt", ""), ("n", 2), ("frobnicate", 1),
])
def test_bad_parameters_get_400_naming_the_parameter(served, field, value):
    live, _, _ = served
    body = {"model": MODEL_NAME, "prompt": "ROMEO:", "max_tokens": 5, field: value}
    response = httpx.post(f"{live.url}/v1/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"]


def test_malformed_json_gets_400(served):
    live, _, _ = served
    response = httpx.post(f"{live.url}/v1/completions", content=b"{not json",
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["message"]
    assert httpx.get(f"{live.url}/health").status_code == 200  # and the server keeps serving


def test_client_disconnect_returns_the_kv_blocks(served):
    live, _, _ = served
    body = {"model": MODEL_NAME, "prompt": "ROMEO:", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"]
        assert httpx.get(f"{live.url}/health").json()["blocks_used"] > 0  # still generating
    status = wait_idle(live.url)
    assert status["running"] == 0 and status["blocks_used"] == 0


def test_32_concurrent_streams_lose_nothing(served):
    """Each client streams its own seeded completion; each must get exactly the naive loop's text."""
    live, model, vocab = served
    prompts = [TEXT[i:i + 3 + i % 7] for i in range(32)]
    lengths = [5 + (7 * i) % 30 for i in range(32)]
    results: dict = {}

    def client(i):
        body = {"model": MODEL_NAME, "prompt": prompts[i], "max_tokens": lengths[i], "temperature": 1.0,
                "seed": 100 + i, "stream": True}
        text = []
        with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text.append(json.loads(line[6:])["choices"][0]["text"])
        results[i] = "".join(text)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert sorted(results) == list(range(32))
    for i in range(32):
        expected = naive_generate(model, vocab.encode(prompts[i]), lengths[i], SamplingConfig(), seed=100 + i)
        assert results[i] == vocab.decode(expected), i
    status = wait_idle(live.url)
    assert status["blocks_used"] == 0 and status["running"] == 0


def browser_executable() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    missing("no Chromium on PATH: apt-get install -y chromium (the web page test needs a real browser)")


def test_web_page_streams_text_in_a_real_browser(served):
    sync_api = require("playwright.sync_api", "playwright is not installed: pip install playwright")
    executable = browser_executable()
    live, model, vocab = served
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                             args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page()
            page.goto(live.url + "/")
            page.fill("#prompt", "ROMEO:")
            page.select_option("#preset", "deterministic")
            page.fill("#max_tokens", "60")
            page.click("#submit")
            page.wait_for_function("document.getElementById('status').textContent.includes('(done)')",
                                   timeout=60_000)
            shown = page.text_content("#generated")
            status = page.text_content("#status")
        finally:
            browser.close()
    assert shown == vocab.decode(naive_generate(model, vocab.encode("ROMEO:"), 60, SamplingConfig(temperature=0)))
    assert status.startswith("60 tokens")

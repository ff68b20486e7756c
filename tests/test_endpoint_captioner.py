"""`captions.captioner: openai_compatible`: requests, timeouts, retries, concurrency, errors and the content-hash cache,
against a stand-in OpenAI-compatible server on 127.0.0.1 started by the tests."""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from neu_det_pipeline.captions.descriptions import CachedDescriber
from neu_det_pipeline.captions.endpoint import EndpointDescriber
from neu_det_pipeline.config import CaptionsConfig, load_config
from neu_det_pipeline.config.captions import EndpointConfig
from neu_det_pipeline.errors import ConfigError, PipelineError
from neu_det_pipeline.io import read_jsonl
from neu_det_pipeline.recipe import run_step
from neu_det_pipeline.step2_captions import PARTIAL_RESULTS_FILE, STEP

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the step runs rank with tiny CLIP on a shared CPU

INSTRUCTION = "Describe the texture."
ANSWER = "1. Texture: rough, granular\n2. Shape: long thin lines\n3. Visual characteristics: dark, high contrast"

Reply = tuple[int, Any, float]
"""(HTTP status, JSON payload or raw bytes, seconds to wait before answering)."""


def completion(text: str) -> dict[str, Any]:
    return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


class StandInServer:
    """An OpenAI-compatible chat-completions server: `reply(body, n)` decides the answer to the n-th request (1-based)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.reply: Callable[[dict[str, Any], int], Reply] = lambda body, n: (200, completion(ANSWER), 0.0)
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stand_in.lock:
                    stand_in.requests.append({"path": self.path, "authorization": self.headers.get("Authorization"), "body": body})
                    stand_in.in_flight += 1
                    stand_in.most_in_flight = max(stand_in.most_in_flight, stand_in.in_flight)
                    status, payload, delay = stand_in.reply(body, len(stand_in.requests))
                time.sleep(delay)
                # Done before answering: once the answer is out, the client may send its next request before this
                # thread runs again, and counting it here too would see one request more than the client has open.
                with stand_in.lock:
                    stand_in.in_flight -= 1
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (the timeout test)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def image_bytes(self, request: dict[str, Any]) -> bytes:
        content = request["body"]["messages"][0]["content"]
        url = next(part["image_url"]["url"] for part in content if part["type"] == "image_url")
        return base64.b64decode(url.split(",", 1)[1])


@pytest.fixture
def server() -> Iterator[StandInServer]:
    stand_in = StandInServer()
    thread = threading.Thread(target=stand_in.server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield stand_in
    stand_in.server.shutdown()
    stand_in.server.server_close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "defect.png"
    Image.new("RGB", (16, 16), (90, 90, 90)).save(path)
    return path


def describer(server: StandInServer, **endpoint: Any) -> EndpointDescriber:
    settings = {"base_url": server.base_url, "model": "llava-stand-in", "timeout_s": 2.0, "backoff_s": 0.01, **endpoint}
    return EndpointDescriber(EndpointConfig(**settings), INSTRUCTION, max_new_tokens=40)


# ------------------------------------------------------------------------------------------- requests


def test_one_image_and_the_instruction_per_request_with_the_key_from_the_environment(
    server: StandInServer, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEU_TEST_VLM_KEY", "secret-value")
    [answer] = describer(server, api_key_env="NEU_TEST_VLM_KEY").describe([image])

    assert answer.text == ANSWER and answer.error is None
    [request] = server.requests
    assert request["path"] == "/v1/chat/completions" and request["authorization"] == "Bearer secret-value"
    body = request["body"]
    assert body["model"] == "llava-stand-in" and body["max_tokens"] == 40 and body["temperature"] == 0
    [message] = body["messages"]
    assert [part["type"] for part in message["content"]] == ["text", "image_url"]
    assert message["content"][0]["text"] == INSTRUCTION
    assert message["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert server.image_bytes(request) == image.read_bytes()


def test_a_slow_answer_times_out_and_the_retry_gets_it(server: StandInServer, image: Path) -> None:
    server.reply = lambda body, n: (200, completion(f"answer {n}"), 1.0 if n == 1 else 0.0)
    [answer] = describer(server, timeout_s=0.2, max_retries=1).describe([image])
    assert answer.text == "answer 2" and len(server.requests) == 2


def test_a_slow_server_is_given_up_after_the_bounded_retries(server: StandInServer, image: Path) -> None:
    server.reply = lambda body, n: (200, completion("late"), 0.5)
    [answer] = describer(server, timeout_s=0.1, max_retries=1).describe([image])
    assert answer.text is None and len(server.requests) == 2
    assert "within 0.1 s (captions.endpoint.timeout_s) (after 2 tries)" in answer.error


@pytest.mark.parametrize(("status", "requests"), [(503, 3), (429, 3), (400, 1), (401, 1)])
def test_error_statuses_are_retried_only_when_a_later_try_may_succeed(
    server: StandInServer, image: Path, status: int, requests: int
) -> None:
    server.reply = lambda body, n: (status, {"error": {"message": "no"}}, 0.0)
    [answer] = describer(server, max_retries=2).describe([image])
    assert answer.text is None and f"HTTP {status}" in answer.error and "\n" not in answer.error
    assert len(server.requests) == requests


def test_a_retried_error_then_success(server: StandInServer, image: Path) -> None:
    server.reply = lambda body, n: (500, b"oops", 0.0) if n < 3 else (200, completion("fine"), 0.0)
    [answer] = describer(server, max_retries=2).describe([image])
    assert answer.text == "fine" and len(server.requests) == 3


@pytest.mark.parametrize("payload", [b"not json", {"choices": []}, {"choices": [{"message": {"content": "  "}}]}, {"data": 1}])
def test_a_malformed_answer_is_one_error_line_and_not_retried(server: StandInServer, image: Path, payload: Any) -> None:
    server.reply = lambda body, n: (200, payload, 0.0)
    [answer] = describer(server, max_retries=3).describe([image])
    assert answer.text is None and answer.error.startswith("malformed answer from ") and "\n" not in answer.error
    assert len(server.requests) == 1


def test_requests_run_at_most_concurrency_at_once(server: StandInServer, tmp_path: Path) -> None:
    server.reply = lambda body, n: (200, completion("ok"), 0.3)  # long enough for the two to overlap on a loaded machine
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), (i, i, i)).save(paths[-1])
    answers = describer(server, concurrency=2).describe(paths)
    assert [answer.text for answer in answers] == ["ok"] * 6
    assert server.most_in_flight == 2


def test_the_same_endpoint_model_and_instruction_later_send_nothing(server: StandInServer, image: Path, tmp_path: Path) -> None:
    first = CachedDescriber(describer(server), tmp_path / "cache")
    assert [found.text for found in first.describe([image, image])] == [ANSWER, ANSWER] and len(server.requests) == 1
    again = CachedDescriber(describer(server), tmp_path / "cache")  # a later run
    assert again.describe([image])[0].text == ANSWER and again.asked == 0 and len(server.requests) == 1
    other = EndpointDescriber(EndpointConfig(base_url=server.base_url, model="llava-stand-in"), "Other words.", 40)
    assert CachedDescriber(other, tmp_path / "cache").describe([image])[0].text == ANSWER and len(server.requests) == 2


# --------------------------------------------------------------------------------------------- config


def test_the_key_itself_is_refused_and_never_echoed() -> None:
    with pytest.raises(ConfigError, match="api_key_env must be the NAME of an environment variable") as error:
        load_config(None, ["captions.endpoint.api_key_env=sk-abc123-secret"])
    with pytest.raises(ValueError, match="api_key_env must be the NAME") as direct:
        EndpointConfig(api_key_env="sk-abc123-secret")
    assert "abc123" not in str(error.value) and "abc123" not in str(direct.value)


def test_an_unset_key_variable_is_one_config_error(server: StandInServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEU_TEST_UNSET_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"api_key_env='NEU_TEST_UNSET_KEY' names an environment variable that is not set"):
        describer(server, api_key_env="NEU_TEST_UNSET_KEY")


def test_the_endpoint_captioner_needs_its_url_and_the_llava_style() -> None:
    with pytest.raises(ValueError, match=r"needs captions\.endpoint\.base_url and captions\.endpoint\.model"):
        CaptionsConfig(prompt_style="llava", captioner="openai_compatible")
    with pytest.raises(ValueError, match=r"captioner='openai_compatible' does not write the captions of prompt_style='keywords'"):
        CaptionsConfig(prompt_style="keywords", captioner="openai_compatible", endpoint={"base_url": "http://x/v1", "model": "m"})
    with pytest.raises(ValueError, match=r"captioner='blip2' does not write the captions of prompt_style='llava'"):
        CaptionsConfig(prompt_style="llava", captioner="blip2")
    assert CaptionsConfig(prompt_style="llava").resolved_captioner() == "llava"
    assert CaptionsConfig().resolved_captioner() is None


def test_doctor_names_the_endpoint_and_an_unset_key_variable(monkeypatch: pytest.MonkeyPatch, server: StandInServer) -> None:
    from neu_det_pipeline.doctor import diagnose, model_needs

    monkeypatch.delenv("NEU_TEST_UNSET_KEY", raising=False)
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "base.yaml", [
        "captions.prompt_style=llava", "captions.captioner=openai_compatible", f"captions.endpoint.base_url={server.base_url}",
        "captions.endpoint.model=llava:7b", "captions.endpoint.api_key_env=NEU_TEST_UNSET_KEY",
    ])  # fmt: skip
    report = diagnose(config)
    assert ("caption endpoint", f"step2_captions sends each training image to {server.base_url} (llava:7b), API key from $NEU_TEST_UNSET_KEY") in report.machine
    assert any(problem.startswith("captions.endpoint.api_key_env='NEU_TEST_UNSET_KEY': the variable is not set") for problem in report.problems)
    assert "models.llava" not in {need.key for need in model_needs(config)} and server.requests == []


# ----------------------------------------------------------------------------------------------- step 2


def test_step2_fails_past_the_failure_fraction_then_asks_only_for_what_is_missing(
    make_config, step0_sample_dir: Path, tmp_path: Path, server: StandInServer, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(step0_sample_dir / "step0_prepare", out / "step0_prepare")
    manifest = [row for row in read_jsonl(out / "step0_prepare" / "manifest.jsonl") if row["split"] == "train"]
    first = min(manifest, key=lambda row: row["id"])  # in Step 2's first batch
    broken = (out / "step0_prepare" / first["image"]).read_bytes()
    server.reply = lambda body, n: (400, b"bad image", 0.0) if server.image_bytes(server.requests[n - 1]) == broken else (200, completion(ANSWER), 0.0)
    overrides = [
        "captions.prompt_style=llava", "captions.captioner=openai_compatible", "captions.batch_size=16",
        f"captions.endpoint.base_url={server.base_url}", "captions.endpoint.model=llava-stand-in",
        "captions.endpoint.backoff_s=0.01",
    ]  # fmt: skip

    with pytest.raises(PipelineError, match=rf"1 of {len(manifest)} images got no description \(more than captions\.endpoint\.max_failure_fraction=0\.0"):
        run_step(STEP, make_config(*overrides, output_dir=out))
    printed = "".join(capsys.readouterr().err.split())  # the console may wrap the line
    assert "".join(f"{first['id']}: no description: HTTP 400".split()) in printed
    assert len(server.requests) == 16  # the first batch decided it: nothing more was sent

    # Fixed server: the resumed run asks only for the failed image and the batches never sent.
    server.reply = lambda body, n: (200, completion(ANSWER), 0.0)
    summary = run_step(STEP, make_config(*overrides, output_dir=out))
    assert len(server.requests) == 16 + 1 + (len(manifest) - 16)
    assert summary["descriptions"]["asked_now"] == len(manifest) - 15 and summary["descriptions"]["failed"] == 0
    rows = read_jsonl(out / STEP.name / "captions.jsonl")
    for row in rows:
        assert row["prompt"] == (
            f"a grayscale photo of {row['token']} on a steel strip, rough, granular, long thin lines, dark, high contrast"
        )
        assert row["description"] == ANSWER and row["description_error"] is None
    assert not (out / STEP.name / PARTIAL_RESULTS_FILE).exists()


def test_every_config_keeps_the_endpoint_off_by_default() -> None:
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "base.yaml")
    assert config.captions.captioner is None and config.captions.endpoint.base_url is None

"""Descriptions from an OpenAI-compatible chat-completions API (`captions.captioner: openai_compatible`).

Works with any server that speaks the OpenAI chat format with image inputs: vLLM (`vllm serve
llava-hf/llava-1.5-7b-hf`), Ollama (`/v1`), or a hosted API. Each request carries one image (a base64 data
URI) and `captions.description_instruction`; greedy decoding (`temperature: 0`). Requests run
`captions.endpoint.concurrency` at a time, each with `timeout_s` per connection and read, retried after
timeouts, connection errors, HTTP 429 and 5xx with a doubling back-off; any other failure is final for the
image. The API key is read from the environment variable that `api_key_env` names and sent only in the
`Authorization` header: it never appears in a config, a file or an error line. Only the standard library.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from neu_det_pipeline.captions.descriptions import Description
from neu_det_pipeline.config.captions import EndpointConfig
from neu_det_pipeline.errors import ConfigError

RETRIED_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
"""HTTP statuses that a later try may not get (overload, restarts); others (400, 401, 404, ...) are final."""


class EndpointError(Exception):
    """A final failure for one image: the one line the step prints for it."""


class _Retry(Exception):
    """A failure another try may not have."""


class EndpointDescriber:
    """One chat-completions request per image, `concurrency` at a time."""

    name = "openai_compatible"

    def __init__(self, config: EndpointConfig, instruction: str, max_new_tokens: int) -> None:
        if not (config.base_url and config.model):  # the config validator says the same for step runs
            raise ConfigError("captions.endpoint.base_url and captions.endpoint.model must be set for captioner openai_compatible")
        self.config, self.instruction, self.max_new_tokens = config, instruction, max_new_tokens
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self.api_key = _api_key(config.api_key_env)
        self.identity: dict[str, Any] = {
            "base_url": config.base_url, "model": config.model, "instruction": instruction, "max_new_tokens": max_new_tokens,
        }  # fmt: skip

    def describe(self, paths: Sequence[Path]) -> list[Description]:
        with ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="endpoint") as pool:
            return list(pool.map(self._describe_one, paths))

    def _describe_one(self, path: Path) -> Description:
        try:
            return Description(self.ask(path))
        except EndpointError as exc:
            return Description(None, str(exc))

    def request_body(self, path: Path) -> dict[str, Any]:
        mime = mimetypes.guess_type(path.name)[0] or "image/png"
        data_uri = f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"
        content = [{"type": "text", "text": self.instruction}, {"type": "image_url", "image_url": {"url": data_uri}}]
        return {
            "model": self.config.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_new_tokens,
            "temperature": 0,
        }

    def ask(self, path: Path) -> str:
        """The answer for one image, after at most `max_retries` further tries; EndpointError when there is none."""
        body = json.dumps(self.request_body(path)).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        tries = self.config.max_retries + 1
        for attempt in range(tries):
            try:
                return self._post(body, headers)
            except _Retry as exc:
                if attempt + 1 == tries:
                    raise EndpointError(f"{exc} (after {tries} tries)") from None
                time.sleep(self.config.backoff_s * 2**attempt)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _post(self, body: bytes, headers: dict[str, str]) -> str:
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            failure = f"HTTP {exc.code} {exc.reason} from {self.url}"
            if exc.code in RETRIED_STATUS:
                raise _Retry(failure) from None
            raise EndpointError(failure) from None
        except TimeoutError:
            raise _Retry(f"no answer from {self.url} within {self.config.timeout_s} s (captions.endpoint.timeout_s)") from None
        except (urllib.error.URLError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError):  # socket.timeout is TimeoutError
                raise _Retry(f"no answer from {self.url} within {self.config.timeout_s} s (captions.endpoint.timeout_s)") from None
            raise _Retry(f"cannot reach {self.url}: {reason}") from None
        return _answer_text(raw, self.url)


def _answer_text(raw: bytes, url: str) -> str:
    """`choices[0].message.content` of a chat-completions answer (a string, or a list of text parts)."""
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise EndpointError(f"malformed answer from {url}: no choices[0].message.content in {raw[:80]!r}") from None
    if isinstance(content, list):
        content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str) or not content.strip():
        raise EndpointError(f"malformed answer from {url}: choices[0].message.content is empty")
    return content


def _api_key(variable: str | None) -> str | None:
    if variable is None:
        return None
    key = os.environ.get(variable)
    if not key:
        raise ConfigError(
            f"captions.endpoint.api_key_env={variable!r} names an environment variable that is not set: "
            f"export {variable}=<your key> before running Step 2"
        )
    return key

"""The shipped example config with its demo provider, used exactly as the README shows."""

from __future__ import annotations

import asyncio
import io
import wave
from pathlib import Path

import openai
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import build
from gateway.config import load

ROOT = Path(__file__).parent.parent
DEMO_KEY = "gw-demo-not-a-secret"  # the key the README and config.example.toml show


@pytest.fixture
async def example(aiohttp_server, monkeypatch: pytest.MonkeyPatch, tmp_path) -> TestServer:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)  # the example config keeps its usage database in the cwd
    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "MISTRAL_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    return await aiohttp_server(build(load(ROOT / "config.example.toml")))


@pytest.fixture
async def client(example: TestServer):  # type: ignore[no-untyped-def]
    c = openai.AsyncOpenAI(base_url=str(example.make_url("/v1")), api_key=DEMO_KEY, max_retries=0)
    yield c
    await c.close()


async def test_readme_key_works_and_answers_deterministically(client: openai.AsyncOpenAI) -> None:
    messages = [{"role": "user", "content": "Say hello"}]
    a = await client.chat.completions.create(model="demo/echo", messages=messages)  # type: ignore[arg-type]
    b = await client.chat.completions.create(model="demo/echo", messages=messages)  # type: ignore[arg-type]
    assert a.choices[0].message.content == b.choices[0].message.content
    assert "Say hello" in (a.choices[0].message.content or "")
    assert a.usage is not None and a.usage.completion_tokens > 10
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    assert a.model == "demo/echo"


async def test_stream_matches_non_stream(client: openai.AsyncOpenAI) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Stream it"}]
    whole = await client.chat.completions.create(model="demo", messages=messages)  # type: ignore[arg-type]
    stream = await client.chat.completions.create(
        model="demo",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},  # type: ignore[arg-type]
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 10  # word by word
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.model == "demo" for c in chunks)


async def test_max_tokens_and_stop(client: openai.AsyncOpenAI) -> None:
    short = await client.chat.completions.create(
        model="demo/echo",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,  # type: ignore[arg-type]
    )
    assert short.choices[0].finish_reason == "length"
    assert short.usage is not None and short.usage.completion_tokens <= 5
    stopped = await client.chat.completions.create(
        model="demo/echo",
        messages=[{"role": "user", "content": "hi"}],
        stop=["demo"],  # type: ignore[arg-type]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert "demo" not in (stopped.choices[0].message.content or "")


async def test_embeddings_are_unit_vectors(client: openai.AsyncOpenAI) -> None:
    result = await client.embeddings.create(model="demo/embed", input=["a", "b"], dimensions=32)
    assert len(result.data) == 2
    for item in result.data:
        assert len(item.embedding) == 32
        assert abs(sum(v * v for v in item.embedding) - 1.0) < 1e-6
    assert result.data[0].embedding != result.data[1].embedding


async def test_image_and_speech(client: openai.AsyncOpenAI) -> None:
    import base64

    image = await client.images.generate(model="demo/paint", prompt="a red square")
    assert image.data is not None and image.data[0].b64_json is not None
    assert base64.b64decode(image.data[0].b64_json).startswith(b"\x89PNG\r\n\x1a\n")
    speech = await client.audio.speech.create(
        model="demo/voice", voice="alloy", input="Hello world", response_format="wav"
    )
    with wave.open(io.BytesIO(speech.content)) as wav:
        assert wav.getframerate() == 16000
        assert wav.getnframes() > 1000


async def test_sync_client_with_the_example(example: TestServer) -> None:
    def call() -> str:
        with openai.OpenAI(base_url=str(example.make_url("/v1")), api_key=DEMO_KEY) as c:
            r = c.chat.completions.create(
                model="demo/echo", messages=[{"role": "user", "content": "x"}]
            )
            return r.choices[0].message.content or ""

    assert "demo provider" in await asyncio.to_thread(call)

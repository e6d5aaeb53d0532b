"""The TOML config: strict keys and types, precise messages, environment-provided secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import AliasConfig, ConfigError, load, loads
from gateway.router import Router

ROOT = Path(__file__).parent.parent

MINIMAL = """
[[providers]]
name = "openai"
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "GW_TEST_OPENAI_KEY"
models = [{ id = "gpt-4o", price_in = 2.5 }]
"""


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        loads(text, source="gw.toml")
    return str(caught.value)


def test_example_config_is_valid() -> None:
    config = load(ROOT / "config.example.toml")
    assert config.server.port == 8080
    assert config.server.host == "127.0.0.1"
    names = [p.name for p in config.providers]
    assert "demo" in names and "openai" in names
    assert config.keys[0].id == "demo"


def test_defaults() -> None:
    config = loads(MINIMAL)
    assert config.server.request_timeout == 60.0
    assert config.server.max_body_bytes == 10 * 1024 * 1024
    model = config.providers[0].models[0]
    assert model.upstream_name == "gpt-4o"
    assert model.capabilities == ("chat",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nprot = 1", "server: unknown key 'prot'"),
        ('[server]\nport = "80"', 'server.port: expected an integer, got "80"'),
        ("[server]\nport = 70000", "server.port: 70000 is not a TCP port"),
        ("[server]\nrequest_timeout = 0", "server.request_timeout: must be greater than 0"),
        ("[sever]\nport = 1", "top level: unknown key 'sever'"),
        (
            MINIMAL.replace("price_in = 2.5", 'price_in = "cheap"'),
            'providers[0] (openai).models[0] (gpt-4o).price_in: expected a number, got "cheap"',
        ),
        (
            MINIMAL.replace("price_in = 2.5", "prce_in = 2.5"),
            "providers[0] (openai).models[0] (gpt-4o): unknown key 'prce_in'",
        ),
        (
            MINIMAL.replace('kind = "openai"', 'kind = "opneai"'),
            'providers[0] (openai).kind: "opneai" is not one of "openai", "anthropic", "gemini", "demo"',
        ),
        (
            MINIMAL.replace('base_url = "https://api.openai.com/v1"', ""),
            "providers[0] (openai).base_url: openai providers need an http:// or https:// URL",
        ),
        (MINIMAL.replace('name = "openai"\n', ""), "providers[0]: missing required key 'name'"),
        (MINIMAL + MINIMAL, "providers[1] (openai).name: provider 'openai' is declared twice"),
        (
            MINIMAL + '[aliases]\n"x" = "openai/gpt-5"',
            'aliases."x": "openai/gpt-5" is not a configured model',
        ),
        (MINIMAL + '[[keys]]\nid = "a"\nhash = "abc"', "keys[0] (a).hash: expected"),
        (
            MINIMAL.replace(
                'models = [{ id = "gpt-4o", price_in = 2.5 }]',
                'models = [{ id = "gpt-4o", capabilities = ["chat", "teleport"] }]',
            ),
            '.capabilities[1]: "teleport" is not one of',
        ),
        ("[server\nport = 1", "gw.toml: not valid TOML"),
    ],
)
def test_errors_name_table_key_and_problem(text: str, message: str) -> None:
    assert message in error_of(text)


def test_provider_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GW_TEST_OPENAI_KEY", raising=False)
    config = loads(MINIMAL)
    assert config.active_providers() == ()
    assert Router(config).models == {}
    monkeypatch.setenv("GW_TEST_OPENAI_KEY", "sk-from-env")
    assert [p.name for p in config.active_providers()] == ["openai"]
    assert config.provider_api_key(config.providers[0]) == "sk-from-env"
    assert list(Router(config).models) == ["openai/gpt-4o"]


def test_alias_may_be_a_string_or_a_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_OPENAI_KEY", "sk")
    config = loads(
        MINIMAL
        + '[aliases]\n"a" = "openai/gpt-4o"\n"b" = ["openai/gpt-4o"]\n'
        + '"c" = { models = ["openai/gpt-4o"], weights = [2] }\n'
    )
    assert config.aliases == {
        "a": AliasConfig(("openai/gpt-4o",)),
        "b": AliasConfig(("openai/gpt-4o",)),
        "c": AliasConfig(("openai/gpt-4o",), (2.0,)),
    }
    with pytest.raises(ConfigError, match="one positive weight per model"):
        loads(MINIMAL + '[aliases]\n"c" = { models = ["openai/gpt-4o"], weights = [1, 2] }\n')


HASH = "sha256:" + "0" * 64


@pytest.mark.parametrize("key_id", ["k" * 65, "-lead", "sp ace", ""])
def test_a_config_key_id_follows_the_admin_rule(key_id: str) -> None:
    """[[keys]] ids are 1 to 64 plain characters, as ids made by the admin API and the CLI;
    a long one is not repeated in the message."""
    message = error_of(MINIMAL + f'[[keys]]\nid = "{key_id}"\nhash = "{HASH}"')
    assert message.startswith("keys[0].id: a key id"), message
    assert "1 to 64" in message
    assert len(message) < 200


def test_a_config_key_id_of_64_characters_is_fine() -> None:
    config = loads(MINIMAL + f'[[keys]]\nid = "{"k" * 64}"\nhash = "{HASH}"')
    assert config.keys[0].id == "k" * 64

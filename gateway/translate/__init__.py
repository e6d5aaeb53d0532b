"""Translators between the OpenAI wire format and each upstream's format.

Importing the package registers every translator module.
"""

from . import openai_anthropic, openai_gemini, openai_openai  # noqa: F401  (each registers)

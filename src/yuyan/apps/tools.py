"""Tool calling over the chat template: render tools and tool turns, constrain a required call, parse calls.

The format is the Hermes/Qwen 2.5 one that open chat models are tuned on, so a model fine-tuned on it (or
imported with it) calls tools through yuyan as it would elsewhere: the tools' signatures go into the system
turn inside <tools></tools>, a call is a JSON object {"name": ..., "arguments": {...}} inside
<tool_call></tool_call>, and a tool's result comes back in the next user turn inside
<tool_response></tool_response> (our chat template has system, user and assistant roles only).

`tool_choice` "auto" decodes freely and parses any calls out of the text (as vLLM's tool parsers do);
"required" or a named function decodes under a grammar that admits only a call whose arguments follow the
function's JSON Schema, so the call always parses and validates; "none" leaves the tools out of the prompt.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from yuyan.errors import UserError
from yuyan.tokenizer import CALL_CLOSE, CALL_OPEN, TOOLS_FOOTER, TOOLS_HEADER

_CALL = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CALL_CLOSE) + r"|$)", re.S)


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def to_openai(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


def _call_text(name: str, arguments: dict) -> str:
    return (
        f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CALL_CLOSE}"
    )


def render(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """OpenAI chat messages (roles system, user, assistant with tool_calls, tool) and function tools ->
    messages of roles system, user and assistant for the chat template. Consecutive tool results share one
    user turn."""
    out: list[dict] = []
    if tools:
        text = TOOLS_HEADER + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) + TOOLS_FOOTER
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": messages[0]["content"] + "\n\n" + text})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": text})
    for m in messages:
        if m["role"] == "tool":
            piece = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("tool"):
                out[-1]["content"] += "\n" + piece
            else:
                out.append({"role": "user", "content": piece, "tool": True})
            continue
        content = m["content"] or ""
        calls = [_call_text(c["name"], c["arguments"]) for c in m.get("tool_calls") or []]
        if calls:
            content = "\n".join(([content] if content else []) + calls)
        out.append({"role": m["role"], "content": content})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def call_grammar(tools: list[dict], name: str | None = None) -> dict:
    """The `GenerationConfig.grammar` of one call to the named function, or to any of `tools`: the call's
    tags around a JSON object whose name is the function's and whose arguments follow its parameters."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise UserError(f"tool_choice names the function {name!r}, which is not among the tools")
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                "arguments": f.get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in chosen
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    schema = {"x-guidance": {"whitespace_flexible": False}, **schema}  # compact JSON: fewer tokens
    lark = f'start: "{CALL_OPEN}\\n" call "\\n{CALL_CLOSE}"\ncall: %json {json.dumps(schema)}'
    return {"type": "grammar", "grammar": lark}


def parse(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """(the content before the calls, or None; the calls) of a reply. A reply with no call, or with one that
    is not a JSON object naming one of `names` with object arguments, is all content and no calls."""
    found = list(_CALL.finditer(text))
    if not found:
        return text, []
    calls = []
    for m in found:
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            return text, []
        if not (
            isinstance(obj, dict) and obj.get("name") in names and isinstance(obj.get("arguments", {}), dict)
        ):
            return text, []
        calls.append(ToolCall(obj["name"], obj.get("arguments", {})))
    content = text[: found[0].start()].strip()
    return content or None, calls


__all__ = ["ToolCall", "render", "call_grammar", "parse", "CALL_OPEN", "CALL_CLOSE"]

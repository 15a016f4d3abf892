"""Text files of examples and prompts for `sae-steer`.

    .jsonl   one example per line: {"prompt": …, "response": …} (either may be absent) or {"text": …}
    .txt     examples separated by lines of exactly `---`; a file with no such line: one per non-blank line

An example's tokens are the tokenizer's template (e.g. BOS), then the prompt's, then the response's; its
response starts after the prompt (`Example.response_start`), so `response_mean` pools the response only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sae.errors import DataError
from sae.models.tokenizer import Tokenizer
from sae.steer.directions import Example


def read_records(path: str | Path, key: str) -> list[dict]:
    """[{prompt, response}] of a .jsonl or .txt file (a .txt text is a response with no prompt); `key` names
    the command-line key in errors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}='{path}': no such file (a .jsonl of prompt/response or a .txt)")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as err:
                raise DataError(f"{key}='{path}' line {i} is not JSON ({err})") from None
            fields = ("prompt", "response", "text")
            if not isinstance(item, dict) or not any(isinstance(item.get(k), str) for k in fields):
                raise DataError(f'{key}=\'{path}\' line {i}: expected {{"prompt": …, "response": …}} or {{"text": …}}')
            records.append({"prompt": item.get("prompt", ""), "response": item.get("response", item.get("text", ""))})
    else:
        lines = text.split("\n")
        parts = text.split("\n---\n") if "---" in lines else lines
        records = [{"prompt": "", "response": p.strip("\n")} for p in parts if p.strip()]
    if not records:
        raise DataError(f"{key}='{path}' holds no examples")
    return records


def examples(records: list[dict], tokenizer: Tokenizer, prefix: list[int], n_ctx: int, key: str) -> list[Example]:
    """Token ids of each record (template + prompt + response, cut to n_ctx) with where its response starts."""
    out = []
    for i, r in enumerate(records):
        prompt = np.concatenate([np.asarray(prefix, np.int32), tokenizer.encode(r["prompt"]) if r["prompt"] else []])
        response = tokenizer.encode(r["response"]) if r["response"] else np.zeros(0, np.int32)
        tokens = np.concatenate([prompt, response]).astype(np.int32)[:n_ctx]
        if len(tokens) <= len(prompt):
            raise DataError(f"{key}: example {i} has no response tokens within the model's {n_ctx} positions")
        out.append(Example(tokens, len(prompt)))
    return out


def prompts(records: list[dict], tokenizer: Tokenizer, prefix: list[int]) -> list[np.ndarray]:
    """The token ids of each record's prompt (of a .txt, its text), after the template."""
    ids = []
    for r in records:
        text = r["prompt"] or r["response"]
        ids.append(np.concatenate([np.asarray(prefix, np.int32), tokenizer.encode(text)]).astype(np.int32))
    return ids

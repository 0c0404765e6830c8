"""How a dead letter is shown to people (`dataflare dlq show`, the socket)."""

from __future__ import annotations

import json
import time
from typing import Any

from dataflare.daemon.deadletters import DeadLetter
from dataflare.sinks.envelope import envelope


def letter_detail(letter: DeadLetter) -> dict[str, Any]:
    """The summary plus the change in envelope form (values made JSON-safe)."""
    env = envelope(letter.change, letter.schema, letter.source)
    return {**letter.summary(), "change": json.loads(json.dumps(env, default=str))}


def render_letters(workflow: str, count: int, letters: list[dict[str, Any]]) -> str:
    if not letters:
        return f"{workflow}: no dead letters"
    lines = [f"{workflow}: {count} dead letter(s)"]
    lines.append(f"{'ID':>6}  {'WHEN':19}  {'NODE':16} {'TABLE':24} OP  ERROR")
    for d in letters:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(d["created"])))
        error = str(d["error"]).replace("\n", " ")
        if len(error) > 70:
            error = error[:67] + "..."
        lines.append(
            f"{d['id']:>6}  {when:19}  {str(d['node'])[:16]:16} {str(d['table'])[:24]:24} "
            f"{d['op']:2}  {error}"
        )
    return "\n".join(lines)

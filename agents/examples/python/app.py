"""`wordcount` in Python: counts the words of `payload.text`. The Rust and
JavaScript examples beside it do the same job, so they can be compared.

Payload: {"text": "...", "summarize": bool, "raise": bool, "spin": bool}.
Output: {"words", "longest", "language", "summary"}. It heartbeats, logs,
prints to stdout (kept in the task's log), keeps the last count in its
state, and asks the model alias `fast` for a summary when asked to,
carrying on without one when no model is configured or granted.

Build (componentize-py, pinned in requirements.txt):
    componentize-py -d ../../../wit -w agent componentize app -o wordcount.wasm
"""
import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host, model, state
from wit_world.imports.colony_agent_types import Failure_Permanent, Level, Outcome, Task

from wordcount import count_words, text_of


class Handler(exports.Handler):
    def run(self, task: Task) -> Outcome:
        host.heartbeat("counting")
        try:
            payload = json.loads(task.payload)
            text = text_of(payload)
        except ValueError as e:
            raise Err(Failure_Permanent(str(e)))
        if payload.get("raise"):
            raise RuntimeError("asked to raise")
        if payload.get("spin"):
            while True:
                pass
        words, longest = count_words(text)
        print(f"counted {words} words")
        host.log(Level.INFO, f"task {task.id}: {words} words")
        # Committed only if the task completes.
        state.set(state.Scope.AGENT, "last_count", str(words))
        summary = summarize(text) if payload.get("summarize") else None
        output = {"words": words, "longest": longest, "language": "python", "summary": summary}
        return Outcome(output=json.dumps(output), spawn=[], needs_review=False)


def summarize(text):
    """One sentence from the model alias `fast`, or None (logged) when the
    operator configured no such model or did not grant it."""
    request = model.Request(
        model="fast",
        messages=[model.Message(role=model.Role.USER, content=f"Summarize in one sentence: {text}",
                                tool_calls=[], tool_call_id=None)],
        tools=[], max_tokens=60, temperature=None, json=False,
    )
    try:
        return model.complete(request).content
    except Err as e:
        host.log(Level.WARN, f"no summary: {e.value}")
        return None

// `wordcount` in JavaScript: counts the words of `payload.text`. The Rust
// and Python examples beside it do the same job, so they can be compared.
//
// Payload: {"text": "...", "summarize": bool, "raise": bool, "spin": bool}.
// Output: {"words", "longest", "language", "summary"}. It heartbeats, logs,
// prints to stdout (kept in the task's log), keeps the last count in its
// state, and asks the model alias `fast` for a summary when asked to,
// carrying on without one when no model is configured or granted.
//
// Build (componentize-js, pinned in package.json): npm install && npm run build
// (`npm ci` where a package-lock.json pins every dependency, as beside the example).
import { heartbeat, log } from "colony:agent/host@0.2.0";
import { complete } from "colony:agent/model@0.2.0";
import { set } from "colony:agent/state@0.2.0";
import { countWords, textOf } from "./wordcount.js";

/** A failure of the run: thrown with a `payload`, it is `run`'s `err`. */
function permanent(message) {
  const error = new Error(message);
  error.payload = { tag: "permanent", val: message };
  return error;
}

function summarize(text) {
  try {
    const reply = complete({
      model: "fast",
      messages: [{ role: "user", content: `Summarize in one sentence: ${text}`, toolCalls: [], toolCallId: undefined }],
      tools: [],
      maxTokens: 60,
      temperature: undefined,
      json: false,
    });
    return reply.content;
  } catch (e) {
    log("warn", `no summary: ${JSON.stringify(e.payload ?? String(e))}`);
    return null;
  }
}

export const handler = {
  run(task) {
    heartbeat("counting");
    let payload, text;
    try {
      payload = JSON.parse(task.payload);
      text = textOf(payload);
    } catch (e) {
      throw permanent(e.message);
    }
    if (payload.raise) throw new TypeError("asked to raise");
    if (payload.spin) for (;;) {}
    const { words, longest } = countWords(text);
    console.log(`counted ${words} words`);
    log("info", `task ${task.id}: ${words} words`);
    // Committed only if the task completes.
    set("agent", "last_count", String(words));
    const summary = payload.summarize ? summarize(text) : null;
    return {
      output: JSON.stringify({ words, longest, language: "javascript", summary }),
      spawn: [],
      needsReview: false,
    };
  },
};

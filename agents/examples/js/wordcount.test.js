import { test } from "node:test";
import assert from "node:assert/strict";
import { countWords, textOf } from "./wordcount.js";

test("counts words and finds the longest", () => {
  assert.deepEqual(countWords("the quick brown fox"), { words: 4, longest: "quick" });
  assert.deepEqual(countWords("   "), { words: 0, longest: null });
});

test("a payload without text is refused", () => {
  assert.throws(() => textOf({ text: 3 }), /"text" is missing/);
  assert.equal(textOf({ text: "a b" }), "a b");
});

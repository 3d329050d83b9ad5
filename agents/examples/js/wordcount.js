// The logic of the JavaScript `wordcount` example, plain JavaScript so that
// it can be unit-tested without the component (`node --test`).

/** The number of words in `text` and the longest (the first, on a tie). */
export function countWords(text) {
  const words = text.split(/\s+/).filter((w) => w.length > 0);
  let longest = null;
  for (const word of words) {
    if (longest === null || word.length > longest.length) longest = word;
  }
  return { words: words.length, longest };
}

/** The text to count; throws saying why the payload can never work. */
export function textOf(payload) {
  const text = payload !== null && typeof payload === "object" ? payload.text : undefined;
  if (typeof text !== "string") {
    throw new Error('payload field "text" is missing; it must be a string');
  }
  return text;
}

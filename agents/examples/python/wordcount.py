"""The logic of the Python `wordcount` example, plain Python so that it can
be unit-tested without the component (`python -m unittest`)."""


def count_words(text):
    """The number of words in `text` and the longest (the first, on a tie)."""
    words = text.split()
    longest = None
    for word in words:
        if longest is None or len(word) > len(longest):
            longest = word
    return len(words), longest


def text_of(payload):
    """The text to count, or a ValueError saying why the payload can never work."""
    text = payload.get("text") if isinstance(payload, dict) else None
    if not isinstance(text, str):
        raise ValueError('payload field "text" is missing; it must be a string')
    return text

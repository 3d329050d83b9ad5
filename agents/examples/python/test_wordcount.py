import unittest

from wordcount import count_words, text_of


class WordcountTest(unittest.TestCase):
    def test_counts_words_and_finds_the_longest(self):
        self.assertEqual(count_words("the quick brown fox"), (4, "quick"))
        self.assertEqual(count_words("   "), (0, None))

    def test_a_payload_without_text_is_refused(self):
        with self.assertRaises(ValueError):
            text_of({"text": 3})
        self.assertEqual(text_of({"text": "a b"}), "a b")


if __name__ == "__main__":
    unittest.main()

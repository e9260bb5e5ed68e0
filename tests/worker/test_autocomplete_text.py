"""The one definition of a word and a sentence end that autocomplete's figures count by."""

from worker.autocomplete_text import (
    cut_at_sentence_end,
    ends_sentence,
    first_word,
    word_spans,
    words,
)


def test_punctuation_is_a_word_and_words_are_lower_cased() -> None:
    assert words("Great, who's next? I'll send $440.") == [
        "great",
        ",",
        "who's",
        "next",
        "?",
        "i'll",
        "send",
        "$",
        "440",
        ".",
    ]


def test_a_prefix_before_each_word_is_the_text_up_to_its_span() -> None:
    text = "Okay. Just to confirm"
    prefixes = [text[:start].rstrip() for start, _ in word_spans(text)]
    assert prefixes == ["", "Okay", "Okay.", "Okay. Just", "Okay. Just to"]


def test_a_completion_is_cut_after_its_first_sentence_end_but_not_in_a_number() -> None:
    assert cut_at_sentence_end(" costs 3.5 dollars. Anything else?") == " costs 3.5 dollars."
    assert cut_at_sentence_end(" to Maria") == " to Maria"
    assert ends_sentence(" done! ") and not ends_sentence(" done,")


def test_the_first_word_of_a_completion() -> None:
    assert first_word(", who would") == ","
    assert first_word("  Restaurants near") == "restaurants"
    assert first_word("   ") is None

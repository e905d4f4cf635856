"""build_job trims over-long FIM and repo-level prompts (Limits.trim), refuses plain ones, and reports the cut."""
from __future__ import annotations

import pytest

from sc2deploy.errors import UserError
from sc2deploy.serving.client import make_request
from sc2deploy.serving.jobs import Limits, build_job
from sc2deploy.tokenizer import Trimmed

PREFIX = "".join(f"def f{i}(x):  # step {i}\n    return x + {i}\n" for i in range(40))
SUFFIX = "".join(f"\nprint(f{i}(2))  # check {i}\n" for i in range(40))
FILES = [(f"src/m{i}.py", f"def helper{i}():\n    return {i}\n") for i in range(3)]
REFUSED = r"more than the model's context of 64 tokens leaves beside max_tokens; shorten the prompt"


def kept(text: str, dropped: int, *, end: bool) -> str:
    return text[dropped:] if end else text[:len(text) - dropped]


def test_fim_prompt_is_trimmed_to_leave_max_tokens(tokenizer):
    job = build_job(make_request(PREFIX, SUFFIX, max_tokens=16), tokenizer, Limits(context_length=64))
    cut = job.trimmed
    assert cut is not None and cut.prefix_chars > 0 and cut.suffix_chars > 0 and cut.context_files == 0
    assert job.prompt_ids == tokenizer.fim_prompt_ids(kept(PREFIX, cut.prefix_chars, end=True),
                                                      kept(SUFFIX, cut.suffix_chars, end=False))
    assert 64 - 16 - 3 <= len(job.prompt_ids) <= 64 - 16 and job.params.max_new_tokens == 16
    assert job.stop_ids == tokenizer.fim_stop_token_ids


def test_unset_max_tokens_leaves_the_default(tokenizer):
    limits = Limits(context_length=128, default_max_tokens=32)
    fits_today = SUFFIX[:200]  # fits the context beside one token, not beside the default
    assert 128 - 32 < len(tokenizer.fim_prompt_ids("x = ", fits_today)) < 128
    job = build_job(make_request("x = ", fits_today), tokenizer, limits)
    assert job.trimmed is not None and len(job.prompt_ids) <= 96 and job.params.max_new_tokens == 32
    half = build_job(make_request(PREFIX, SUFFIX), tokenizer, Limits(context_length=64, default_max_tokens=128))
    assert len(half.prompt_ids) <= 32 and half.params.max_new_tokens == 64 - len(half.prompt_ids)


def test_repo_level_drops_context_files_from_the_front(tokenizer):
    prefix, suffix = "def main():\n    ", "\n    return 0\n"
    request = make_request(prefix, suffix, max_tokens=8, repo_name="octo/demo", file_path="src/app.py",
                           context_files=FILES)
    exact = tokenizer.repo_prompt_ids("octo/demo", [*FILES[1:], ("src/app.py", prefix)], suffix=suffix)
    job = build_job(request, tokenizer, Limits(context_length=len(exact) + 8))
    assert job.trimmed == Trimmed(0, 0, 1) and job.prompt_ids == exact
    plain_repo = make_request(PREFIX, max_tokens=8, repo_name="octo/demo", file_path="src/app.py",
                              context_files=FILES)
    job = build_job(plain_repo, tokenizer, Limits(context_length=64))
    assert job.trimmed == Trimmed(job.trimmed.prefix_chars, 0, 3) and job.trimmed.prefix_chars > 0
    assert job.prompt_ids == tokenizer.repo_prompt_ids(
        "octo/demo", [("src/app.py", kept(PREFIX, job.trimmed.prefix_chars, end=True))])
    assert job.stop_ids == tokenizer.stop_token_ids


def test_nothing_dropped_is_the_old_prompt(tokenizer):
    limits = Limits(context_length=4096)
    job = build_job(make_request(PREFIX, SUFFIX, max_tokens=16), tokenizer, limits)
    assert job.trimmed is None and job.prompt_ids == tokenizer.fim_prompt_ids(PREFIX, SUFFIX)
    request = make_request(PREFIX, SUFFIX, repo_name="octo/demo", file_path="a.py", context_files=FILES)
    job = build_job(request, tokenizer, limits)
    assert job.trimmed is None
    assert job.prompt_ids == tokenizer.repo_prompt_ids("octo/demo", [*FILES, ("a.py", PREFIX)], suffix=SUFFIX)


def test_refusing_instead_of_trimming(tokenizer):
    request = make_request(PREFIX, SUFFIX, max_tokens=16)
    with pytest.raises(UserError, match=REFUSED):
        build_job(request, tokenizer, Limits(context_length=64, trim=False))
    fits_today = make_request("x = ", SUFFIX[:200])  # unset max_tokens: the prompt may take all but one token
    assert build_job(fits_today, tokenizer, Limits(context_length=128, trim=False)).trimmed is None


def test_plain_prompts_are_still_refused(tokenizer):
    with pytest.raises(UserError, match=REFUSED):
        build_job(make_request(PREFIX, max_tokens=16), tokenizer, Limits(context_length=64))
    with pytest.raises(UserError, match="more than the model's context"):  # a file path alone: no repo context
        build_job(make_request(PREFIX, max_tokens=16, file_path="a.py"), tokenizer, Limits(context_length=64))
    with pytest.raises(UserError, match="needs file_path"):
        build_job(make_request(PREFIX, SUFFIX, repo_name="octo/demo"), tokenizer, Limits(context_length=64))


def test_no_room_for_code_is_refused(tokenizer):
    request = make_request(PREFIX, SUFFIX, max_tokens=60, repo_name="octo/demo", file_path="src/app.py")
    with pytest.raises(UserError, match=r"control tokens, repo name and file path \(\d+ tokens\) leave no room "
                                        r"for code within 4 tokens.*ask for fewer tokens"):
        build_job(request, tokenizer, Limits(context_length=64))


def test_a_4_mib_prompt_is_trimmed(tokenizer):
    huge = "x = 1  # 😀\n" * (4 * 2**20 // 14)
    suffix = "\nprint(x)\n"
    job = build_job(make_request(huge, suffix, max_tokens=64), tokenizer, Limits(context_length=2048))
    cut = job.trimmed
    assert cut is not None and cut.suffix_chars == 0 and len(job.prompt_ids) >= 2048 - 64 - 3
    assert job.prompt_ids == tokenizer.fim_prompt_ids(kept(huge, cut.prefix_chars, end=True), suffix)

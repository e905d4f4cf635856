"""StarCoder2 tokenizer: encode/decode, FIM and repo-level prompts, streaming detokenization, stop strings.

Prompt conventions (control tokens are always inserted by id, never parsed out of user text):
  FIM:        <fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>            (the model writes the middle)
  repo-level: <repo_name>{name}<file_sep>{path}\\n{code}<file_sep>{path}\\n{code}...
  repo + FIM: the last file is FIM-transformed with its path line inside the prefix, as StarCoder2 was trained
              (StarCoder2 paper, arXiv:2402.19173, "<file_sep><fim_prefix>filepath1\\ncode1_pre<fim_suffix>..."):
              <repo_name>{name}<file_sep>{path}\\n{code}...
              <file_sep><fim_prefix>{path}\\n{prefix}<fim_suffix>{suffix}<fim_middle>      (one line, no break)
Each text piece between control tokens is encoded on its own, so prompt ids equal the concatenation of
those encodings (and equal Hugging Face's encoding of the prompt string when the text holds no special tokens).

Over-long FIM and repo-level prompts can be trimmed to a token budget (`Tokenizer.fit_prompt_ids`), keeping the
text nearest the cursor; a plain prompt is never trimmed.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Encoding
from tokenizers import Tokenizer as _HFTokenizer

from sc2deploy.errors import UserError

EOS, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>"
FIM_PAD, REPO_NAME, FILE_SEP = "<fim_pad>", "<repo_name>", "<file_sep>"
REPLACEMENT = "\ufffd"
# A newline after a printable ASCII character starts a pre-token of StarCoder2's pre-tokenizer (Digits, then
# the GPT-2 regex) whatever follows: text cut before it encodes to the concatenation of its parts' encodings.
# (Not after a newline: a whitespace run at the very end of a text is one pre-token, inside it may be two.)
_CUT = re.compile(r"(?<=[!-~])\n")
_CHUNK_CHARS, _MIN_CHUNK_CHARS = 1 << 16, 1 << 12


class PromptTooLong(UserError):
    """More tokens than the caller's limit; raised before the whole text is tokenized."""


@dataclass(frozen=True)
class Trimmed:
    """What `Tokenizer.fit_prompt_ids` dropped from a prompt to fit its budget (characters are code points)."""

    prefix_chars: int  # cut from the start of the prefix (the current file's code before the cursor)
    suffix_chars: int  # cut from the end of the suffix
    context_files: int  # whole context files dropped from the front of the list


def packaged_tokenizer_path() -> Path:
    """The StarCoder2 vocabulary shipped with sc2deploy (see sc2deploy/data/PROVENANCE.md)."""
    return Path(__file__).resolve().parent / "data" / "tokenizer.json"


def validate_text(data: bytes | bytearray | memoryview | str, what: str = "input") -> str:
    """Raw bytes (or a str) from a caller -> text, or a UserError saying the input is not valid UTF-8."""
    try:
        if isinstance(data, str):
            data.encode("utf-8")  # lone surrogates (e.g. from surrogateescape) cannot be sent to the model
            return data
        return bytes(data).decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError) as e:
        raise UserError(f"{what} is not valid UTF-8 (bad data at position {e.start}): "
                        f"re-encode it as UTF-8 and try again") from None


def fim_prompt(prefix: str, suffix: str) -> str:
    return f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"


def repo_prompt(repo_name: str | None, files: Sequence[tuple[str, str]], *, suffix: str | None = None) -> str:
    """Repo-level prompt text; with `suffix`, the last file's code is the FIM prefix (see module docstring)."""
    return "".join(text for _, text in _repo_parts(repo_name, files, suffix))


def _repo_parts(repo_name: str | None, files: Sequence[tuple[str, str]], suffix: str | None):
    """The repo prompt as ("special", token) / ("text", text) pieces, shared by the text and id builders."""
    if suffix is not None and not files:
        raise UserError("a repo-level FIM prompt needs at least one file (the one being completed)")
    parts: list[tuple[str, str]] = [] if repo_name is None else [("special", REPO_NAME), ("text", repo_name)]
    for i, (path, code) in enumerate(files):
        if suffix is not None and i == len(files) - 1:
            parts += [("special", FILE_SEP), ("special", FIM_PREFIX), ("text", f"{path}\n{code}"),
                      ("special", FIM_SUFFIX), ("text", suffix), ("special", FIM_MIDDLE)]
        else:
            parts += [("special", FILE_SEP), ("text", f"{path}\n{code}")]
    return parts


def trimmable(suffix: str | None, repo_name: str | None, context_files: Sequence[object]) -> bool:
    """FIM (a suffix) and repo-level context (a repo name or context files) may be trimmed; plain text may not."""
    return suffix is not None or repo_name is not None or bool(context_files)


def _prompt_parts(prefix: str, suffix: str | None, repo_name: str | None, context_files: Sequence[tuple[str, str]],
                  path: str | None):
    """Pieces of a plain, FIM (suffix not None) and/or repo-level (path set) prompt; see the module docstring."""
    if path is not None:
        return _repo_parts(repo_name, [*context_files, (path, prefix)], suffix)
    if repo_name is not None or context_files:
        raise ValueError("repo-level context needs the path of the file being completed")
    if suffix is None:
        return [("text", prefix)]
    return [("special", FIM_PREFIX), ("text", prefix), ("special", FIM_SUFFIX), ("text", suffix),
            ("special", FIM_MIDDLE)]


def _char_start(offsets: Sequence[tuple[int, int]], i: int, end: int) -> int:
    """Where the first character whose tokens all come at or after token `i` starts (`end` if none does).
    The tokens of a character split across tokens overlap: each spans the whole character."""
    while i < len(offsets) and offsets[i][0] < offsets[i - 1][1]:
        i += 1
    return offsets[i][0] if i < len(offsets) else end


def find_stop(text: str, stop_strings: Iterable[str]) -> tuple[str, str | None]:
    """Cut `text` just before the earliest occurrence of any stop string: (text_before, stop) or (text, None).

    Ties (two stops starting at the same index) go to the longer one; empty stop strings are ignored.
    """
    best: tuple[int, int, str] | None = None
    for stop in stop_strings:
        i = text.find(stop) if stop else -1
        if i >= 0 and (best is None or (i, -len(stop)) < best[:2]):
            best = (i, -len(stop), stop)
    return (text, None) if best is None else (text[: best[0]], best[2])


def stop_holdback(text: str, stop_strings: Iterable[str]) -> int:
    """How many trailing chars of `text` are a proper prefix of some stop string (so a stream must hold them).

    Check `find_stop` first: a complete stop at the end is not counted here.
    """
    held = 0
    for stop in stop_strings:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


class Tokenizer:
    """A StarCoder2 byte-level BPE tokenizer (Hugging Face `tokenizers`)."""

    def __init__(self, hf: _HFTokenizer, source: str):
        self.source = source
        self._tok = hf  # special-token strings in text are parsed as control tokens
        self._plain = _HFTokenizer.from_str(hf.to_str())
        self._plain.encode_special_tokens = True  # ... and here they are ordinary text
        found = {t: hf.token_to_id(t) for t in (EOS, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD, REPO_NAME, FILE_SEP)}
        missing = [t for t, i in found.items() if i is None]
        if missing:
            raise UserError(f"{source} is not a StarCoder2 tokenizer (no {', '.join(missing)}): "
                            f"use the tokenizer.json that came with the checkpoint")
        self._control: dict[str, int] = {t: i for t, i in found.items() if i is not None}
        self.eos_id = self.bos_id = self._control[EOS]
        self.fim_prefix_id, self.fim_middle_id = self._control[FIM_PREFIX], self._control[FIM_MIDDLE]
        self.fim_suffix_id, self.fim_pad_id = self._control[FIM_SUFFIX], self._control[FIM_PAD]
        self.repo_name_id, self.file_sep_id = self._control[REPO_NAME], self._control[FILE_SEP]
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        # Bounds the bytes any token covers (byte-level BPE spells each byte with one character; UTF-8 may
        # take two bytes for that character, which only loosens the bound).
        self.max_token_bytes = max(len(token.encode("utf-8")) for token in hf.get_vocab(with_added_tokens=False))
        self.special_ids = frozenset(i for i, t in hf.get_added_tokens_decoder().items() if t.special)
        self.stop_token_ids = frozenset({self.eos_id, self.file_sep_id, self.fim_pad_id})
        # In a FIM completion, any other FIM/repo control token also means the middle is over.
        self.fim_stop_token_ids = self.stop_token_ids | {self.fim_prefix_id, self.fim_middle_id,
                                                         self.fim_suffix_id, self.repo_name_id}

    @classmethod
    def load(cls, checkpoint_dir: str | Path | None = None) -> Tokenizer:
        """`<checkpoint_dir>/tokenizer.json` if present (or a tokenizer.json path), else the packaged vocabulary."""
        if checkpoint_dir is not None:
            path = Path(checkpoint_dir)
            if path.is_dir():
                path = path / "tokenizer.json"
                if not path.exists():
                    return cls.load(None)
            if not path.is_file():
                raise UserError(f"tokenizer file {path} not found: pass a checkpoint directory or its tokenizer.json")
            try:
                hf = _HFTokenizer.from_str(path.read_text(encoding="utf-8"))
            except Exception as e:  # OSError, UnicodeError, or the tokenizers library's parse error
                reason = (str(e).splitlines() or [type(e).__name__])[0]
                raise UserError(f"cannot read tokenizer file {path} ({reason}): "
                                f"replace it with the checkpoint's original tokenizer.json") from None
            return cls(hf, str(path))
        return cls(_HFTokenizer.from_file(str(packaged_tokenizer_path())), "sc2deploy/data/tokenizer.json")

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, *, parse_special: bool = False, limit: int | None = None,
               chunk_chars: int | None = None) -> list[int]:
        """Token ids, no special tokens added. Special-token strings in `text` stay text unless `parse_special`.

        With `limit`, raises PromptTooLong as soon as the text surely has more than `limit` tokens: at once
        when its UTF-8 bytes exceed `limit` tokens of the longest kind, else after encoding the pieces (cut at
        pre-token boundaries, about `chunk_chars` each: by default four characters per token of the limit,
        from 4 k to 64 k) that pass the limit. The GIL is released while the
        library encodes (`encode_batch`; `encode` holds it), so other threads keep running.
        """
        tok = self._tok if parse_special else self._plain
        if limit is None:
            return tok.encode_batch([text], add_special_tokens=False)[0].ids
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > limit * self.max_token_bytes:
            raise PromptTooLong(f"the prompt ({size} bytes) holds more than {limit} tokens")
        if chunk_chars is None:
            chunk_chars = min(_CHUNK_CHARS, max(_MIN_CHUNK_CHARS, 4 * limit))
        ids: list[int] = []
        start = 0
        while start < len(text):
            cut = _CUT.search(text, start + max(chunk_chars, 1)) if start + chunk_chars < len(text) else None
            end = cut.start() if cut else len(text)
            ids += tok.encode_batch([text[start:end]], add_special_tokens=False)[0].ids
            if len(ids) > limit:
                raise PromptTooLong(f"the prompt holds more than {limit} tokens")
            start = end
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}): {min(ids)}..{max(ids)}")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def fim_prompt_ids(self, prefix: str, suffix: str, *, limit: int | None = None) -> list[int]:
        return self._join(_prompt_parts(prefix, suffix, None, (), None), limit)

    def repo_prompt_ids(self, repo_name: str | None, files: Sequence[tuple[str, str]], *,
                        suffix: str | None = None, limit: int | None = None) -> list[int]:
        """Ids of `repo_prompt(repo_name, files, suffix=suffix)`, user text never parsed for control tokens."""
        return self._join(_repo_parts(repo_name, files, suffix), limit)

    def fit_prompt_ids(self, prefix: str, suffix: str | None = None, *, budget: int, trim: bool = True,
                       repo_name: str | None = None, context_files: Sequence[tuple[str, str]] = (),
                       path: str | None = None) -> tuple[list[int], Trimmed | None]:
        """Ids of at most `budget` tokens for the prompt `encode` (neither suffix nor path), `fim_prompt_ids`
        (a suffix) or `repo_prompt_ids` (the file `path` with code `prefix` after `context_files`) builds, and
        what was dropped to fit (None: nothing).

        Without `trim`, or for a plain prompt (no suffix, repo name or context files): PromptTooLong past the
        budget. Otherwise the control tokens, the repo name (a few tokens saying where every file comes from)
        and the path line are kept (UserError if they leave no token for code); the end of the prefix and the
        start of the suffix share what is left about 3:1, what one side does not need going to the other; then
        context files fill the rest, whole, the last ones (most relevant) first. Kept text is a character-level
        cut encoded on its own: the ids are the builders' ids of the kept texts. Over-long text is tokenized
        only up to about what the budget can hold.
        """
        def build(prefix: str, suffix: str | None, files: Sequence[tuple[str, str]], limit: int | None = None):
            return self._join(_prompt_parts(prefix, suffix, repo_name, files, path), limit)

        try:
            return build(prefix, suffix, context_files, budget), None
        except PromptTooLong:
            if not (trim and trimmable(suffix, repo_name, context_files)):
                raise
        frame = len(build("", None if suffix is None else "", ()))
        if frame >= budget:
            raise UserError(f"the prompt's control tokens, repo name and file path ({frame} tokens) leave no room "
                            f"for code within {budget} tokens; shorten the repo name or file path, or ask for "
                            f"fewer tokens")
        prefix_room, suffix_room = self._split(prefix, suffix, budget - frame)
        while True:  # a repo-level prompt can overshoot: its path line and code are one text
            kept_prefix = self._keep(prefix, prefix_room, end=True)
            kept_suffix = None if suffix is None else self._keep(suffix, suffix_room, end=False)
            ids = build(kept_prefix, kept_suffix, ())
            if len(ids) <= budget:
                break
            prefix_room -= len(ids) - budget
        files = self._last_files(context_files, budget - len(ids))
        trimmed = Trimmed(len(prefix) - len(kept_prefix), len(suffix or "") - len(kept_suffix or ""),
                          len(context_files) - len(files))
        return build(kept_prefix, kept_suffix, files), trimmed

    def _split(self, prefix: str, suffix: str | None, room: int) -> tuple[int, int]:
        """Tokens for the prefix and for the suffix out of `room`: about 3:1, or what the shorter side needs."""
        if suffix is None:
            return room, 0
        prefix_share = room - room // 4
        need = self._count(prefix, prefix_share)
        if need is not None:
            return need, room - need
        need = self._count(suffix, room - prefix_share)
        if need is not None:
            return room - need, need
        return prefix_share, room - prefix_share

    def _count(self, text: str, limit: int) -> int | None:
        """How many tokens `text` encodes to, or None past `limit`."""
        try:
            return len(self.encode(text, limit=limit))
        except PromptTooLong:
            return None

    def _keep(self, text: str, tokens: int, *, end: bool) -> str:
        """About the longest tail (`end`) or head of `text` that encodes on its own to at most `tokens` tokens."""
        piece, encoding = self._window(text, tokens, end=end)
        count = len(encoding.ids)
        while tokens > 0:
            if count <= tokens:
                kept = piece
            elif end:
                kept = piece[_char_start(encoding.offsets, count - tokens, len(piece)):]
            else:
                kept = piece[:encoding.offsets[tokens][0]]
            over = len(self.encode(kept)) - tokens  # a cut text may encode to more tokens than its share
            if over <= 0:
                return kept
            tokens -= over
        return ""

    def _window(self, text: str, tokens: int, *, end: bool) -> tuple[str, Encoding]:
        """The tail (`end`) or head of `text` to cut from, and its encoding: all of `text`, or a slice that holds
        more than `tokens` tokens. Slices start at four characters a token and grow to the most that `tokens`
        tokens can span, so a huge text is never tokenized whole."""
        most = (tokens + 1) * self.max_token_bytes  # a character is at least one byte
        size = min(most, max(_MIN_CHUNK_CHARS, 4 * (tokens + 1)))
        while True:
            piece = text[max(0, len(text) - size):] if end else text[:size]
            encoding = self._plain.encode_batch([piece], add_special_tokens=False)[0]
            if len(encoding.ids) > tokens or len(piece) == len(text) or size >= most:
                return piece, encoding
            size = min(most, 4 * size)

    def _last_files(self, files: Sequence[tuple[str, str]], tokens: int) -> Sequence[tuple[str, str]]:
        """The longest tail of `files` whose repo-prompt pieces take at most `tokens` tokens."""
        for start in range(len(files), 0, -1):
            try:
                tokens -= len(self._join(_repo_parts(None, files[start - 1:start], None), tokens))
            except PromptTooLong:
                return files[start:]
        return files

    def _join(self, parts: Iterable[tuple[str, str]], limit: int | None) -> list[int]:
        """Ids of ("special", token) / ("text", text) parts; PromptTooLong past `limit` tokens (see encode)."""
        ids: list[int] = []
        for kind, text in parts:
            left = None if limit is None else limit - len(ids)
            if kind == "special":
                ids.append(self._control[text])
            else:
                ids += self.encode(text, limit=left)
            if limit is not None and len(ids) > limit:
                raise PromptTooLong(f"the prompt holds more than {limit} tokens")
        return ids

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get text that is safe to show.

    Ids whose text ends in U+FFFD (a UTF-8 character split across tokens) are held back until it completes.
    The deltas of `add` plus `flush()` concatenate to `tok.decode(all_ids)` exactly. Past `max_pending` held
    ids, the longest head ending between characters is released (a run of bytes that never decode), so the
    window, and the cost of an `add`, stays O(max_pending) unless every token boundary splits a character.
    """

    def __init__(self, tok: Tokenizer, *, skip_special_tokens: bool = False, max_pending: int = 8):
        self._tok, self._skip, self._max = tok, skip_special_tokens, max(max_pending, 1)
        self._pending: list[int] = []

    @property
    def pending(self) -> int:
        """Number of ids received but not yet turned into text."""
        return len(self._pending)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        if not 0 <= token_id < self._tok.vocab_size:
            raise ValueError(f"token id {token_id} out of range [0, {self._tok.vocab_size})")
        if self._skip and token_id in self._tok.special_ids:
            return ""  # contributes no bytes: holding it would only grow the window
        self._pending.append(token_id)
        text = self._decode(self._pending)
        if not text.endswith(REPLACEMENT):
            self._pending.clear()
            return text
        if len(self._pending) <= self._max:
            return ""
        # Release the longest head whose text cannot change whatever comes next: a split is safe iff head and
        # tail decode the same apart as together (an unfinished char at the head's end would not).
        for j in range(len(self._pending) - 1, 0, -1):
            head, tail = self._decode(self._pending[:j]), self._decode(self._pending[j:])
            if head + tail == text:
                del self._pending[:j]
                return head
        return ""

    def flush(self) -> str:
        """The held-back remainder (may contain U+FFFD if the stream ended mid-character)."""
        text = self._decode(self._pending)
        self._pending.clear()
        return text

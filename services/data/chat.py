"""Conversations: rows in the ``messages`` or ``prompt`` + ``completion`` form, checked, rendered with the tokenizer's
chat template, and tokenised with a mask that is true on the assistant's tokens only (pure: no I/O beyond what the
tokenizer object does; :mod:`ddk.data.chat_files` reads the rows from files).

The two forms (one per file; :func:`conversations` detects it from the file's first row):

- ``messages``: ``[{"role": ..., "content": ...}, ...]``, roles ``system`` / ``user`` / ``assistant`` (the OpenAI /
  Hugging Face chat form). Every assistant turn is trained on.
- ``prompt`` + ``completion`` (TRL's form): each a string or a messages list. A string prompt is one ``user`` turn, a
  string completion one ``assistant`` turn. Only the completion's assistant turns are trained on (a prompt may hold
  earlier assistant turns, few-shot examples, which are context).

Bad rows raise :class:`ChatRowError` (a :class:`~ddk.errors.UsageError`: exit 2) carrying the file, the line (for
Parquet: the row number, 1-based) and the field: a file mixing forms, a row with neither form, a malformed turn, an
unknown role, a conversation without an assistant turn to train on.

Masks come from the rendered prefixes, so a template needs no ``{% generation %}`` markers: for assistant turn ``i``
``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i+1])`` are compared with the render of
the whole conversation; the turn's labelled tokens run from where the first ends to where the second does (compared
as text and mapped to tokens by the tokenizer's character offsets; compared as tokens when it has no offsets). When
the template ignores ``add_generation_prompt`` (renders the same text with and without it), the start is found with
``messages[:i]`` plus an empty assistant turn instead, which ends at the same header. A template that fails on a
row (its own ``raise_exception``, say roles that must alternate) is a :class:`ChatTemplateError` naming the row.
Within that span the labels stop at the first special token after the content (the end-of-turn token, labelled:
``<|im_end|>``, ``<|eot_id|>``, ``</s>``); what a template writes after it (ChatML's newline) is not labelled. A
span without a special token is labelled whole. A token that straddles the header and the content (BPE merging the
header's last space with the content's first word) is labelled: it carries the start of the answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from ddk.errors import UsageError

ROLES = ("system", "user", "assistant")
MESSAGES = "messages"
PROMPT_COMPLETION = "prompt+completion"
FORMS = (MESSAGES, PROMPT_COMPLETION)
OVERFLOW = ("truncate_left", "drop")
IGNORE_INDEX = -100  # the target of a position that is not trained on (torch's cross_entropy ignore_index)


class ChatRowError(UsageError):
    """A bad conversation row: ``file``, ``line`` (Parquet: the row number, 1-based), ``field`` and the problem.
    The message is one line: ``FILE:LINE: field 'FIELD': PROBLEM``."""

    def __init__(self, file: str, line: int, field: str, problem: str):
        self.file, self.line, self.field, self.problem = str(file), int(line), field, problem
        super().__init__(f"{self.file}:{self.line}: field {field!r}: {problem}")


class ChatTemplateError(UsageError):
    """The tokenizer cannot render conversations: no chat template, or a template whose renders of a conversation's
    prefixes do not line up with the whole conversation."""


@dataclass(frozen=True)
class Conversation:
    """One checked conversation: ``messages`` as plain ``{"role", "content"}`` dicts, ``trained`` the indices of the
    assistant turns that carry labels, and where it came from."""

    messages: tuple[dict, ...]
    trained: tuple[int, ...]
    file: str = ""
    line: int = 0


@dataclass
class Tokenised:
    """A conversation's tokens and, per token, whether it is a label (an assistant token the loss counts)."""

    input_ids: list[int]
    assistant_mask: list[bool]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_labels(self) -> int:
        return sum(self.assistant_mask)

    def targets(self) -> list[int]:
        """Next-token targets, aligned with ``input_ids``: position ``j`` predicts ``input_ids[j + 1]`` when that token
        is a label, else :data:`IGNORE_INDEX`; the last position predicts nothing. The targets never reach past
        the conversation, so packed conversations cannot train on each other's tokens."""
        ids, m = self.input_ids, self.assistant_mask
        return [ids[j + 1] if m[j + 1] else IGNORE_INDEX for j in range(len(ids) - 1)] + ([IGNORE_INDEX] if ids else [])


@dataclass
class FitStats:
    """What :func:`fit_length` did over a file or a domain: conversations seen, kept whole, truncated from the left,
    dropped (too long under ``drop``, or nothing left to train on after truncation), and the tokens and label
    tokens kept."""

    conversations: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    label_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------------------------
# rows -> conversations

def row_form(row: Any) -> str | None:
    """The form of one row: :data:`MESSAGES`, :data:`PROMPT_COMPLETION` (it has ``prompt``), or None."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return MESSAGES
    if "prompt" in row:
        return PROMPT_COMPLETION
    return None


def _turns(value: Any, name: str, file: str, line: int) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ChatRowError(file, line, name, "must be a non-empty list of {role, content} turns")
    out = []
    for k, turn in enumerate(value):
        where = f"{name}[{k}]"
        if not isinstance(turn, dict):
            raise ChatRowError(file, line, where, "must be an object with 'role' and 'content'")
        role = turn.get("role")
        if role is None:
            raise ChatRowError(file, line, f"{where}.role", "missing")
        if role not in ROLES:
            raise ChatRowError(file, line, f"{where}.role",
                               f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = turn.get("content")
        if not isinstance(content, str):
            raise ChatRowError(file, line, f"{where}.content",
                               "missing" if content is None else f"must be a string, not {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def row_conversation(row: Any, form: str, file: str = "", line: int = 0) -> Conversation:
    """One row of ``form`` checked and turned into a :class:`Conversation`; :class:`ChatRowError` when it is bad."""
    if not isinstance(row, dict):
        raise ChatRowError(file, line, "(row)", f"must be an object, not {type(row).__name__}")
    got = row_form(row)
    if got is None:
        raise ChatRowError(file, line, "messages",
                           "the row has neither 'messages' nor 'prompt' + 'completion'")
    if "messages" in row and "prompt" in row:
        raise ChatRowError(file, line, "prompt", "the row has both 'messages' and 'prompt'; use one form")
    if got != form:
        raise ChatRowError(file, line, "messages" if got == MESSAGES else "prompt",
                           f"the file mixes forms: this row is {got}, earlier rows are {form}")
    if form == MESSAGES:
        msgs = _turns(row["messages"], "messages", file, line)
        trained = tuple(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        if not trained:
            raise ChatRowError(file, line, "messages", "no assistant turn")
        return Conversation(tuple(msgs), trained, file, line)
    if "completion" not in row:
        raise ChatRowError(file, line, "completion", "missing ('prompt' needs 'completion')")
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str):
        p = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        p = _turns(prompt, "prompt", file, line)
    else:
        raise ChatRowError(file, line, "prompt", f"must be a string or a messages list, not {type(prompt).__name__}")
    if isinstance(completion, str):
        c = [{"role": "assistant", "content": completion}]
    elif isinstance(completion, list):
        c = _turns(completion, "completion", file, line)
    else:
        raise ChatRowError(file, line, "completion",
                           f"must be a string or a messages list, not {type(completion).__name__}")
    trained = tuple(len(p) + k for k, m in enumerate(c) if m["role"] == "assistant")
    if not trained:
        raise ChatRowError(file, line, "completion", "no assistant turn")
    return Conversation(tuple(p + c), trained, file, line)


def conversations(rows: Iterable[tuple[int, Any]], file: str = "") -> Iterator[Conversation]:
    """The conversations of one file's ``(line, row)`` pairs. The file's form is its first row's; a later row of
    the other form, or any bad row, raises :class:`ChatRowError` naming the file, line and field."""
    form: str | None = None
    for line, row in rows:
        if form is None:
            form = row_form(row)
            if form is None:
                row_conversation(row, MESSAGES, file, line)  # raises: neither form (or not an object)
        yield row_conversation(row, form, file, line)


# ---------------------------------------------------------------------------------------------------------------
# rendering and masks

def tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def require_chat_template(tokenizer: Any) -> None:
    """:class:`ChatTemplateError` naming the tokenizer when it has no chat template to render conversations with."""
    if not getattr(tokenizer, "chat_template", None) or not hasattr(tokenizer, "apply_chat_template"):
        raise ChatTemplateError(f"tokenizer {tokenizer_name(tokenizer)} has no chat template; conversation domains "
                                "need one (set 'chat_template' in its tokenizer_config.json or a chat_template.jinja)")


def special_ids(tokenizer: Any) -> set[int]:
    """The ids of the tokenizer's special tokens (its named ones and the added tokens marked special): the
    candidates for an end-of-turn token."""
    ids = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def _render(tokenizer: Any, messages: Sequence[dict], generation_prompt: bool, where: str = "") -> str:
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # the template's own raise_exception(...) or any Jinja error: the row, not a traceback
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ChatTemplateError(f"{where or 'a conversation'}: the chat template of tokenizer "
                                f"{tokenizer_name(tokenizer)} fails on it: {msg}") from None
    if not isinstance(text, str):
        raise ChatTemplateError(f"tokenizer {tokenizer_name(tokenizer)}: apply_chat_template(tokenize=False) "
                                f"returned {type(text).__name__}, not a string")
    return text


def _encode(tokenizer: Any, text: str) -> list[int]:
    # the template writes BOS (and any other special token) itself: no special tokens added here
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    """The tokens of ``text`` and their character spans (None when the tokenizer gives none: a slow tokenizer)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, KeyError, ValueError):
        return _encode(tokenizer, text), None
    ids = list(enc["input_ids"])
    return ids, offsets if len(offsets) == len(ids) else None


def _common(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def tokenise_conversation(tokenizer: Any, conv: Conversation | Sequence[dict],
                          eot_ids: Iterable[int] | None = None) -> Tokenised:
    """``conv`` rendered with the tokenizer's chat template, tokenised, with the mask on the trained assistant turns'
    content tokens and their end-of-turn token (see the module's docstring). ``eot_ids``: the ids that end a turn
    (default: :func:`special_ids`). A plain messages list trains every assistant turn.

    Where the tokenizer gives character offsets (a fast tokenizer), the rendered prefixes are compared as text and
    the boundaries mapped to tokens by the offsets, so a boundary inside a run of whitespace that the tokenizer
    splits differently alone and in context (``"\\n\\n"`` at the end of a header) still falls right; otherwise the
    prefixes' tokens are compared with the conversation's."""
    require_chat_template(tokenizer)
    if not isinstance(conv, Conversation):
        msgs = tuple(conv)
        conv = Conversation(msgs, tuple(i for i, m in enumerate(msgs) if m["role"] == "assistant"))
    eot = set(special_ids(tokenizer) if eot_ids is None else (int(i) for i in eot_ids))
    msgs = list(conv.messages)
    where = f"{conv.file}:{conv.line}" if conv.file else ""
    full = _render(tokenizer, msgs, False, where)
    ids, offsets = _encode_offsets(tokenizer, full)
    mask = [False] * len(ids)
    for i in conv.trained:
        turn = _render(tokenizer, msgs[: i + 1], False, where)
        before = _render(tokenizer, msgs[:i], True, where) if i else ""
        if i == 0 or before == _render(tokenizer, msgs[:i], False, where):  # the template ignores the generation prompt
            before = _render(tokenizer, msgs[:i] + [{"role": "assistant", "content": ""}], False, where)
            probe = True
        else:
            probe = False
        if offsets is not None:
            c0 = _common(before, turn) if probe else (len(before) if turn.startswith(before) else _common(before, turn))
            c0 = min(c0, _common(turn, full))
            c1 = _common(turn, full)
            start = next((j for j, (a, b) in enumerate(offsets) if b > c0 or (a == b and a >= c0)), len(ids))
            end = next((j for j, (a, b) in enumerate(offsets) if a >= c1 and j >= start), len(ids))
        else:
            upto = _encode(tokenizer, turn)
            start = _common(_encode(tokenizer, before), upto if probe else ids)
            end = _common(upto, ids)
            if end < len(upto) and end < len(ids):
                end += 1  # the turn's last token merged with what follows it: it still carries the turn's end
        if end <= start:
            at = f" ({where})" if where else ""
            raise ChatTemplateError(f"tokenizer {tokenizer_name(tokenizer)}: the chat template renders assistant turn "
                                    f"{i}{at} so that its tokens cannot be told from the rest of the conversation")
        stop = next((j + 1 for j in range(start, end) if ids[j] in eot), end)
        for j in range(start, stop):
            mask[j] = True
    return Tokenised(ids, mask)


def fit_length(t: Tokenised, seq_len: int, overflow: str = "truncate_left",
               stats: FitStats | None = None) -> Tokenised | None:
    """``t`` when it fits in ``seq_len`` tokens; else its last ``seq_len`` tokens (``truncate_left``) or None
    (``drop``). None too when nothing is left to train on. ``stats`` (when given) counts what was done."""
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {OVERFLOW}, not {overflow!r}")
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    st = stats if stats is not None else FitStats()
    st.conversations += 1
    out: Tokenised | None = t
    if len(t) > seq_len:
        if overflow == "drop":
            out = None
        else:
            out = Tokenised(t.input_ids[-seq_len:], t.assistant_mask[-seq_len:])
    # a label at position 0 has no position before it to predict it from
    if out is not None and not any(out.assistant_mask[1:]):
        out = None
    if out is None:
        st.dropped += 1
        return None
    if len(out) < len(t):
        st.truncated += 1
    else:
        st.kept += 1
    st.tokens += len(out)
    st.label_tokens += sum(out.assistant_mask[1:])
    return out


@dataclass
class Prepared:
    """The conversations of a file or domain, tokenised and fitted, and the counts."""

    items: list[Tokenised] = field(default_factory=list)
    stats: FitStats = field(default_factory=FitStats)


def prepare_conversations(tokenizer: Any, convs: Iterable[Conversation], seq_len: int,
                          overflow: str = "truncate_left") -> Prepared:
    """Tokenise and fit every conversation of ``convs``: the ones kept, in order, and the counts."""
    require_chat_template(tokenizer)
    out = Prepared()
    eot = special_ids(tokenizer)
    for conv in convs:
        t = fit_length(tokenise_conversation(tokenizer, conv, eot), seq_len, overflow, out.stats)
        if t is not None:
            out.items.append(t)
    return out

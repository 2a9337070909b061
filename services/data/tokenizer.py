"""The tokenizer of the token cache: ``load_tokenizer`` reads a folder's ``tokenizer.json`` with the ``tokenizers``
library alone where the folder allows it (:class:`TokenizerFile`; neither transformers nor torch is imported),
``student_tokenizer`` loads ``student.model``'s through transformers, and ``tokenizer_payload`` /
``make_encoder`` carry a fast tokenizer to a worker (its ``tokenizer.json`` text: no pickle) and rebuild it there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from ddk.errors import UsageError

log = logging.getLogger(__name__)

GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TOKENIZER_ENV = "DDK_DATA_TOKENIZER"  # "auto" (default), "tokenizers" (tokenizer.json whatever the class), "transformers"


class TokenizerFile:
    """A tokenizer read from a folder's ``tokenizer.json`` with the ``tokenizers`` library only: what
    :func:`prepare_domains` uses of a transformers tokenizer (``eos_token_id``, ``get_vocab()``, ``len()``,
    ``is_fast``, ``backend_tokenizer``), and ``__call__`` / ``encode`` / ``decode`` as transformers has them
    (no special tokens added unless asked). The vocabulary is the file's, added tokens included, which is what
    transformers' ``get_vocab()`` returns for the same folder (:func:`load_tokenizer` checks when it is)."""

    is_fast = True

    def __init__(self, backend, eos_token: str, name_or_path: str = ""):
        self.backend_tokenizer = backend
        self.eos_token = eos_token
        self.eos_token_id = backend.token_to_id(eos_token)
        self.name_or_path = name_or_path

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, texts, add_special_tokens: bool = True) -> dict:
        one = isinstance(texts, str)
        enc = self.backend_tokenizer.encode_batch([texts] if one else list(texts),
                                                  add_special_tokens=add_special_tokens)
        ids = [e.ids for e in enc]
        return {"input_ids": ids[0] if one else ids}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"TokenizerFile({self.name_or_path!r}, vocab {len(self)}, eos {self.eos_token!r})"


def _token_text(value: Any) -> str | None:
    """A special token's text as tokenizer_config.json / special_tokens_map.json write it (str or AddedToken dict)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def tokenizer_file(path: str | Path) -> tuple[TokenizerFile | None, str]:
    """(the folder's tokenizer read with ``tokenizers`` only, "") when that gives what transformers would --
    the same ``get_vocab()`` (hence the same fingerprint and cache key), EOS and token ids -- else (None, why).

    The rules of transformers 5's ``AutoTokenizer.from_pretrained`` that matter here: the special tokens are
    tokenizer_config.json's, overridden by special_tokens_map.json when the config has no
    ``added_tokens_decoder``; a special token missing from the vocabulary is *added* (another vocabulary: not
    done here); a named tokenizer class (``Qwen2Tokenizer``, ``LlamaTokenizer``, ...) rebuilds its backend from
    the vocabulary and merges with its own normalizer and pre-tokenizer, and a vocabulary over 100,000 may get
    the Mistral regex patch, so only the generic classes (:data:`GENERIC_TOKENIZER_CLASSES`) are read
    directly (``$DDK_DATA_TOKENIZER=tokenizers`` reads tokenizer.json whatever the class)."""
    p = Path(path).expanduser()
    tj = p / "tokenizer.json"
    if not tj.is_file():
        return None, "no tokenizer.json"
    try:
        cfg = json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        cfg = {}
    except (OSError, ValueError) as e:
        return None, f"tokenizer_config.json: {e}"
    if not isinstance(cfg, dict):
        return None, "tokenizer_config.json is not an object"
    forced = os.environ.get(TOKENIZER_ENV, "auto").strip().lower() == "tokenizers"
    cls = cfg.get("tokenizer_class")
    if not forced and cls not in GENERIC_TOKENIZER_CLASSES:
        return None, f"tokenizer_class {cls!r} (transformers may rebuild it)"
    if cfg.get("split_special_tokens") or cfg.get("add_prefix_space") is not None:
        return None, "split_special_tokens / add_prefix_space set in tokenizer_config.json"
    special = dict(cfg)
    if "added_tokens_decoder" not in cfg and (p / "special_tokens_map.json").is_file():
        try:
            special.update(json.loads((p / "special_tokens_map.json").read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            return None, f"special_tokens_map.json: {e}"
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(tj))
    except Exception as e:  # noqa: BLE001 - a file tokenizers cannot read: transformers may
        return None, f"tokenizer.json: {e}"
    vocab = backend.get_vocab(with_added_tokens=True)
    if not forced and len(vocab) > 100_000:
        return None, "a vocabulary over 100,000 (transformers may patch its regex)"
    names = [_token_text(special.get(k)) for k in SPECIAL_TOKEN_KEYS]
    names += [_token_text(special[k]) for k in special if k.endswith("_token") and k not in SPECIAL_TOKEN_KEYS]
    for k in ("additional_special_tokens", "extra_special_tokens"):
        extra = special.get(k) or []
        names += [_token_text(t) for t in (extra.values() if isinstance(extra, dict) else extra)]
    for idx, tok in (cfg.get("added_tokens_decoder") or {}).items():
        text = _token_text(tok)
        if text is None or vocab.get(text) != int(idx):
            return None, f"added_tokens_decoder {idx}: {text!r} is not that id in tokenizer.json"
    missing = [t for t in names if t is not None and t not in vocab]
    if missing:
        return None, f"special token {missing[0]!r} not in tokenizer.json (transformers would add it)"
    eos = _token_text(special.get("eos_token"))
    if eos is None:
        return None, "no eos_token in tokenizer_config.json"
    return TokenizerFile(backend, eos, str(p)), ""


def load_tokenizer(path: str | Path):
    """The tokenizer of a model folder for preparing data: :func:`tokenizer_file` when it can (no transformers,
    no torch imported), else transformers' ``AutoTokenizer`` (with a log line saying why)."""
    how = os.environ.get(TOKENIZER_ENV, "auto").strip().lower()
    if how not in ("auto", "tokenizers", "transformers"):
        raise UsageError(f"{TOKENIZER_ENV}: expected auto, tokenizers or transformers, got {how!r}")
    why = f"{TOKENIZER_ENV}=transformers"
    if how != "transformers":
        tok, why = tokenizer_file(path)
        if tok is not None:
            log.debug("tokenizer %s: read with the tokenizers library (tokenizer.json)", path)
            return tok
    log.info("tokenizer %s: loading with transformers (%s)", path, why)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"tokenizer: cannot load one from {path} ({e})") from None




def student_tokenizer(cfg):
    """(tokenizer, vocabulary size) of a train config's ``student.model`` (through transformers)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.student.model, trust_remote_code=False)
        student_vocab = int(AutoConfig.from_pretrained(cfg.student.model, trust_remote_code=False).vocab_size)
    except (OSError, ValueError) as e:
        raise UsageError(f"student.model: cannot load a tokenizer and config from {cfg.student.model} ({e})") from None
    return tokenizer, student_vocab


# ---------------------------------------------------------------------------------------------------------
# tokenising a chunk (in this process, a worker process or a Ray Data worker)

def tokenizer_payload(tokenizer) -> tuple[str, Any, str]:
    """What a worker needs to rebuild ``tokenizer``: (kind, blob, key). A fast tokenizer travels as its
    ``tokenizer.json`` text (workers then need only the ``tokenizers`` package). Any other cannot leave this
    process (no pickle crosses a process boundary): kind ``"local"``, tokenised here (:meth:`Executors.get`)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if getattr(tokenizer, "is_fast", False) and backend is not None:
        blob: Any = backend.to_str()
        return "fast", blob, hashlib.sha1(blob.encode("utf-8")).hexdigest()
    return "local", tokenizer, f"local-{id(tokenizer)}"


def make_encoder(payload: tuple[str, Any, str]) -> Callable[[list[str]], list[list[int]]]:
    """texts -> token ids of each, without special tokens (what ``tokenizer(texts, add_special_tokens=False)``
    gives), with truncation and padding off."""
    kind, blob, _ = payload
    if kind == "fast":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(blob)
        tok.no_truncation()
        tok.no_padding()
        encode = getattr(tok, "encode_batch_fast", None) or tok.encode_batch  # _fast: no offsets computed

        def run(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in encode(texts, add_special_tokens=False)]

        return run
    hf = blob  # "local": the tokenizer object itself, in this process

    def run_hf(texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in hf(texts, add_special_tokens=False)["input_ids"]]

    return run_hf


_ENCODERS: dict[str, Callable] = {}


def cached_encoder(payload) -> Callable:
    """:func:`make_encoder` of ``payload``, built once per process (keyed by the payload's key)."""
    if payload[2] not in _ENCODERS:
        _ENCODERS[payload[2]] = make_encoder(payload)
    return _ENCODERS[payload[2]]

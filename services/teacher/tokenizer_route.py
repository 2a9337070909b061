"""``GET /v1/tokenizer``: the teacher's tokenizer files as JSON, so that a trainer with another tokenizer can
tokenise text the teacher's way (cross-tokenizer distillation, issue 29; the trainer side is
``ddk.trainer.xtok_teacher``).

The answer is ``{"files": {name: parsed JSON}, "tokenizer_fingerprint": ...}`` with the contents of the model
folder's ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` (those that exist): data,
never code. A folder without a ``tokenizer.json`` (a slow-only tokenizer) answers 404 with a JSON body naming the
file. Like ``/v1/info`` the route is open (no bearer token): the vocabulary is what ``/v1/info`` already hashes.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import JSONResponse

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def read_tokenizer_files(model_dir: str | Path) -> dict[str, object]:
    """``{name: parsed JSON}`` of the tokenizer files in ``model_dir`` (FileNotFoundError without tokenizer.json;
    ValueError for a file that is not JSON)."""
    folder = Path(model_dir)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer.json: the teacher's model folder {folder} has none (a fast "
                                "tokenizer is needed for cross-tokenizer distillation)")
    files = {}
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            try:
                files[name] = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{name}: not valid JSON ({e})") from None
    return files


def tokenizer_router(model_dir: str | Path | None, state: dict) -> APIRouter:
    """The router of ``GET /v1/tokenizer`` for the teacher of ``model_dir``; ``state`` is the app's state dict
    (its ``info`` gives the fingerprint once the engine is loaded). The files are read at the first request."""
    router = APIRouter()
    cache: dict[str, object] = {}

    @router.get("/v1/tokenizer")
    async def tokenizer():
        if model_dir is None:
            return JSONResponse({"detail": "tokenizer.json: this teacher was started without a model folder"},
                                status_code=404)
        if "files" not in cache:
            try:
                cache["files"] = read_tokenizer_files(model_dir)
            except FileNotFoundError as e:
                return JSONResponse({"detail": str(e)}, status_code=404)
            except ValueError as e:
                return JSONResponse({"detail": str(e)}, status_code=500)
        info = state.get("info") or {}
        return {"files": cache["files"], "tokenizer_fingerprint": info.get("tokenizer_fingerprint")}

    return router

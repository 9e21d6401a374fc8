"""The `llm-shard` command line. Each verb is thin: it parses, calls the library, prints.

Every failure, of any verb, is one `error: <message>` on stderr and a non-zero exit, never
a traceback; `--debug` shows the traceback of expected errors for bug reports. The flags
that build an `LLM` (serve, chat) are EngineConfig's fields (ENGINE_FLAGS).
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
from pathlib import Path
from typing import NoReturn

import click

from llm_shard.cluster.ray_glue import CONNECT_TIMEOUT
from llm_shard.cluster.resources import node_resources
from llm_shard.coordinator.config import MAX_PROMPTS_PER_REQUEST, EngineConfig
from llm_shard.models import arch_names
from llm_shard.models.errors import (
    DTYPE_NAMES,
    KV_DTYPE_NAMES,
    ConvertError,
    SourceError,
    StoreError,
    TokenizerError,
    UnknownArch,
)

EXPECTED = (ConvertError, SourceError, StoreError, UnknownArch, TokenizerError, FileExistsError)


def _fail(message: str, code: int, hint: str | None = None) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    if hint:
        click.echo(hint, err=True)
    sys.exit(code)


def _fail_click(e: click.ClickException) -> NoReturn:
    """click's own errors (a bad flag, a refused value) in this CLI's one style."""
    ctx = getattr(e, "ctx", None)
    hint = (f"Try '{ctx.command_path} -h' for help."
            if isinstance(e, click.UsageError) and ctx is not None else None)
    _fail(e.format_message(), e.exit_code, hint)


class Group(click.Group):
    """The top-level group: every failure of every verb prints `error: <message>` on
    stderr, never a traceback (`--debug` shows the traceback of expected errors), and
    exits non-zero (2 for expected errors and bad usage, 1 for others)."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.ClickException as e:
            _fail_click(e)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EXPECTED as e:
            if ctx.params.get("debug"):
                raise
            _fail(str(e), 2)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.ClickException as e:
            _fail_click(e)
        except SystemExit as e:  # a benchmark's SystemExit("why")
            if isinstance(e.code, str):
                _fail(e.code, 1)
            raise


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks of expected errors.")
def cli(debug: bool) -> None:
    """llm-shard: run big language models across a home lab of cheap machines."""


@cli.command()
@click.argument("src")
@click.option("--arch", type=click.Choice(arch_names()), default=None,
              help="Architecture; may be left out when SRC says it (GGUF, config.json).")
@click.option("--dtype", type=click.Choice(list(DTYPE_NAMES)), default="int8", show_default=True)
@click.option("-o", "--out", "out", required=True, help="Store folder to create.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at OUT.")
@click.option("--rounding", type=click.Choice(["gguf", "nearest", "gptq"]), default=None,
              help="int8: gguf keeps a GGUF's own int8/4/5-bit blocks exactly (the default "
                   "for GGUF files); nearest (the default for others) or gptq (calibrated "
                   "on built-in text, slower; needs the source's tokenizer) round each "
                   "weight per output channel.")
def convert(src: str, arch: str | None, dtype: str, out: str, overwrite: bool,
            rounding: str | None) -> None:
    """Convert a checkpoint (HF folder, Meta folder, Megatron file, GGUF) into a store."""
    from llm_shard.models.checkpoint.convert import convert as run

    if (Path(out) / "manifest.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a store; pass --overwrite to replace it")
    store = run(src, out, arch=arch, dtype=dtype, rounding=rounding)
    click.echo(f"wrote {store.path}: {store.manifest['arch']}, {store.n_blocks} blocks, "
               f"{dtype}, {store.nbytes / 2**20:.1f} MiB")


@cli.command()
@click.argument("model")
@click.option("--dtype", type=click.Choice(list(DTYPE_NAMES)), default="int8", show_default=True)
def verify(model: str, dtype: str) -> None:
    """Check every file of MODEL's store (a name or a path) against its manifest's sha256."""
    from llm_shard.models.checkpoint.catalog import resolve

    s = resolve(model, dtype=dtype)
    s.verify()
    click.echo(f"{s.path}: {len(s.manifest['files'])} files OK")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--remove", "remove", metavar="NAME", multiple=True,
              help="Delete the local store NAME (a folder in the store folder) to free disk.")
@click.option("--clean-partial", is_flag=True,
              help="Delete *.partial staging folders that interrupted conversions left in the "
                   "store folder (run it while no conversion is running).")
def models(as_json: bool, remove: tuple[str, ...], clean_partial: bool) -> None:
    """Known model names, where their weights come from, and what is stored locally."""
    from llm_shard.models.checkpoint.catalog import home, local_status

    if remove or clean_partial:
        for path in [_store_folder(name) for name in remove] + (
                sorted(home().glob("*.partial")) if clean_partial else []):
            size = _remove(path)
            click.echo(f"removed {path} ({size / 2**20:.1f} MiB)")
        return
    rows = local_status()
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"store folder: {home()}")
    for r in rows:
        local = f"{r['bytes'] / 2**20:8.1f} MiB" if r["store"] else "   not local"
        click.echo(f"  {r['name']:16} {r['arch']:12} {local}  {r['source']}")


def _store_folder(name: str):
    """The folder of a store NAME under $LLM_SHARD_HOME; never a path outside it."""
    from llm_shard.models.checkpoint.catalog import home

    path = home() / name
    if not name or "/" in name or name in (".", "..") or not path.exists():
        stored = sorted(p.name for p in home().iterdir()) if home().is_dir() else []
        raise click.ClickException(f"no store named {name!r} in {home()}; stored: "
                                   f"{', '.join(stored) or 'nothing'}")
    if path.is_dir() and not (path / "manifest.json").exists() \
            and not path.name.endswith(".partial"):
        raise click.ClickException(f"{path} is not a store (no manifest.json); not removing it")
    return path


def _remove(path) -> int:
    import shutil

    if path.is_dir():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        shutil.rmtree(path)
    else:
        size = path.stat().st_size
        path.unlink()
    return size


@cli.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(1, None))
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--dtype", type=click.Choice(list(DTYPE_NAMES)), default="int8", show_default=True)
def generate(model: str, prompt: str, max_tokens: int, chat: bool, dtype: str) -> None:
    """Greedy one-shot generation in this process, streamed to the terminal."""
    from llm_shard.models.checkpoint.catalog import resolve
    from llm_shard.models.runner import LocalModel
    from llm_shard.models.text.tokenizer import StreamDecoder

    store = resolve(model, dtype=dtype)
    tok = store.tokenizer()
    text = tok.render_chat([{"role": "user", "content": prompt}]) if chat else prompt
    local = LocalModel(store)
    stream = StreamDecoder(tok)
    for token in local.stream(tok.encode(text), max_tokens, tok.eos_ids):
        if token in tok.eos_ids:
            break
        click.echo(stream.push(token), nl=False)
    click.echo(stream.flush())


# Until workers calibrate themselves (they measure on start), plans use nominal speeds:
# bytes of weights per second for a CPU core pair's RAM, an SSD, a small GPU.
NOMINAL_SPEED = {"gpu": 200e9, "ram": 20e9, "disk": 1.5e9}


def _overhead(value: str | None, store) -> tuple[int, str]:
    """(bytes, how it was found) of each worker's runtime for `plan`: SIZE as given, or
    measured in this process once it imported what a worker imports."""
    from llm_shard.cluster.types import Memory
    from llm_shard.coordinator.costs import measure_runtime

    if value is not None:
        try:
            return Memory.parse(value), "as given (--overhead)"
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--overhead") from None
    how = ("measured here (Python, torch, ZeroMQ, Ray's client and the model code); serve "
           "measures each worker's own, Ray's core worker included")
    return Memory(measure_runtime(store)), how


@cli.command()
@click.argument("model")
@click.option("--worker", "workers", multiple=True, required=True,
              help="A worker's budget, e.g. ram=2GiB,disk=8GiB,gpu=4GiB (repeat per worker); "
                   "ram bounds its whole process, runtime included.")
@click.option("--objective", type=click.Choice(["latency", "throughput"]), default="latency",
              show_default=True)
@click.option("--cache-tokens", default=None, type=click.IntRange(0, None),
              help="KV-cache tokens to reserve on every block (all sequences together); "
                   "default: as many as the memory left after the weights holds.")
@click.option("--overhead", default=None, metavar="SIZE",
              help="Each worker's runtime (RAM its budget pays before the model); default: "
                   "measured in this process.")
@click.option("--dtype", type=click.Choice(list(DTYPE_NAMES)), default="int8", show_default=True)
@click.option("--use-all-workers", is_flag=True,
              help="Give every worker a stage, as serve --use-all-workers does.")
def plan(model: str, workers: tuple[str, ...], objective: str, cache_tokens: int | None,
         overhead: str | None, dtype: str, use_all_workers: bool) -> None:
    """Print the partition table for MODEL over the given workers, loading no weights."""
    from llm_shard.cluster.types import Capacity, Memory, Tier
    from llm_shard.coordinator.costs import model_cost
    from llm_shard.coordinator.planner import PlanError, WorkerSpec, format_plan
    from llm_shard.coordinator.planner import plan as make_plan
    from llm_shard.models.checkpoint.catalog import resolve

    store = resolve(model, dtype=dtype)
    runtime, how = _overhead(overhead, store)
    try:
        specs = [WorkerSpec(Capacity.parse(w), {t: NOMINAL_SPEED[t.value] for t in Tier},
                            runtime) for w in workers]
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--worker") from None
    cost = model_cost(store, cache_tokens)
    try:
        p, report = make_plan(cost, specs, objective=objective,
                              use_all_workers=use_all_workers)
    except PlanError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{store.path.name}: {store.n_blocks} blocks, {dtype}; nominal speeds "
               f"(workers calibrate on start): {NOMINAL_SPEED}; runtime {Memory(runtime)} "
               f"per worker, {how}")
    click.echo(format_plan(p, report, cost))


# bench commands hand every argument, --help included, to the benchmark's own argparse
_PASS_THROUGH = {"ignore_unknown_options": True, "help_option_names": []}


@cli.group()
def bench() -> None:
    """Benchmarks that print figures and ratios to physical limits."""


# name -> what it measures; each runs llm_shard.benchmarks.<name>.main on its arguments
BENCHMARKS = {
    "kernels": "GB/s of weight bytes for fp32, bf16 and int8 linear kernels vs memory "
               "bandwidth.",
    "swap": "Disk-tier decode of a random PanGu-α-2.6B int8 far over its RAM budget: cold "
            "disk bandwidth, tok/s with prefetch on and off, disk throughput achieved "
            "(--help).",
    "pipeline": "Decode unsplit vs split over 2 and 3 local Ray workers, per-hop cost, "
                "concurrent sequences with and without micro-batches (--help).",
    "gpu": "The GPU tier: int8 kernels per layer against the GPU's read bandwidth, and "
           "decode of a random PanGu-α-2.6B resident on the GPU or streamed from pinned RAM "
           "(--help).",
    "prefix": "Time to first token of each turn of a 10-turn chat with the prefix cache "
              "and without, over 2 local workers; the 10th turn's over the first's "
              "(--help).",
    "scale": "Random LLaMA-7B and PanGu-α-13B int8 on 3 local workers whose RAM budgets sum "
             "to less than the model: decode vs the disk roofline, peak RSS vs budgets, "
             "predicted vs measured, throughput mode (--help).",
    "suite": "The whole suite (decode, versus transformers, load, split, throughput, swap, "
             "scale) "
             "with the machine's bandwidths: writes DIR/bench.json, bench.md and PNG plots "
             "(--help).",
}


def _benchmark(name: str):
    def run(args: tuple[str, ...]) -> None:
        importlib.import_module(f"llm_shard.benchmarks.{name}").main(list(args))

    return run


for _name, _about in BENCHMARKS.items():
    bench.command(_name, help=_about, context_settings=_PASS_THROUGH)(
        click.argument("args", nargs=-1, type=click.UNPROCESSED)(_benchmark(_name)))


SERVE_HELP = f"""Plan, start workers, load MODEL and serve it over HTTP.

Ray: the cluster --address (or RAY_ADDRESS) names, else the one `ray start` began on this
machine, else a private local Ray that it stops on exit (a cluster that another program
started inside itself is not joined). A cluster that does not answer within
{CONNECT_TIMEOUT:.0f} s is an error naming it. Binds 127.0.0.1 unless --host says otherwise.
Ctrl-C (SIGINT) or SIGTERM stops it cleanly."""


def _engine_flag(name: str, *decls: str, **kwargs):
    """A serve/chat flag that sets EngineConfig's field `name`, with the field's default."""
    kwargs.setdefault("default", EngineConfig.default(name))
    return name, click.option(*decls, name, **kwargs)


# The flags that build an LLM, shared by serve and chat: field name -> click option.
ENGINE_FLAGS = dict([
    _engine_flag("address", "--address",
                 help="Ray cluster address (HOST:PORT, ray://…, auto, local: a private "
                      "one); default: RAY_ADDRESS, else this machine's `ray start` cluster, "
                      "else a private local one."),
    _engine_flag("workers", "--worker", multiple=True, metavar="SPEC", default=(),
                 callback=lambda ctx, param, specs: list(specs) or None,
                 help="A worker's budget, e.g. ram=1GiB,disk=8GiB (repeat per worker); "
                      "default: every node's advertised budget."),
    _engine_flag("dtype", "--dtype", type=click.Choice(list(DTYPE_NAMES)), show_default=True,
                 help="Weights of the store."),
    _engine_flag("cache_tokens", "--cache-tokens", show_default=True,
                 type=click.IntRange(16, None),
                 help="KV-cache tokens each stage keeps for all sequences together."),
    _engine_flag("kv_dtype", "--kv-dtype", type=click.Choice(list(KV_DTYPE_NAMES)),
                 show_default=True,
                 help="What each stage's KV cache stores K and V in (int8: a scale per head "
                      "and token); attention computes in float32."),
    _engine_flag("micro_batches", "--micro-batches", type=click.IntRange(1, None),
                 help="Micro-batches in flight (default: one per stage)."),
    _engine_flag("use_all_workers", "--use-all-workers", is_flag=True,
                 help="Give every worker a stage, even where fewer stages would be faster "
                      "(a demo of the split; co-located workers share the cores)."),
    _engine_flag("wire_dtype", "--wire-dtype", type=click.Choice(["bf16", "fp16", "fp32"]),
                 show_default=True, help="Activations between stages."),
    _engine_flag("encrypt", "--no-encrypt", is_flag=True, flag_value=False,
                 help="Plain TCP between coordinator and workers instead of CURVE "
                      "(encrypted, authenticated): only on a trusted single machine."),
    _engine_flag("max_restarts", "--max-restarts", show_default=True,
                 type=click.IntRange(-1, None),
                 help="Times a lost worker is replaced (same node, same budget) within 10 "
                      "minutes; -1: no limit, 0: never (re-plan over the rest)."),
    _engine_flag("prefix_cache", "--no-prefix-cache", is_flag=True, flag_value=False,
                 help="Free each finished sequence's caches instead of keeping them for "
                      "prompts that start the same (a chat's next turn prefills only its "
                      "new tokens)."),
])


def engine_options(f):
    """Adds ENGINE_FLAGS to a verb, which receives them as one `engine` (EngineConfig)."""

    @functools.wraps(f)
    def verb(**kwargs):
        engine = EngineConfig(**{name: kwargs.pop(name) for name in ENGINE_FLAGS})
        return f(engine=engine, **kwargs)

    for option in reversed(ENGINE_FLAGS.values()):
        verb = option(verb)
    return verb


def _open_llm(model: str, engine: EngineConfig):
    from llm_shard.cluster.ray_glue import ClusterError
    from llm_shard.coordinator.llm import LLM
    from llm_shard.coordinator.planner import PlanError

    try:
        return LLM(model, config=engine)
    except EXPECTED:
        raise
    except (PlanError, ClusterError, ValueError) as e:
        raise click.ClickException(str(e)) from None


API_KEY_HELP = {"serve": "Demand 'Authorization: Bearer KEY' on every route but /health "
                         "and the chat page",
                "chat": "For a URL that demands one"}


def _api_key_options(f):
    """--api-key (or LLM_SHARD_API_KEY) and --api-key-file: the verb receives `api_key`,
    the key or None. A file keeps the key out of `ps`; its whitespace ends are dropped."""

    @functools.wraps(f)
    def verb(api_key, api_key_file, **kwargs):
        if api_key_file is not None:
            if api_key:
                raise click.UsageError("give --api-key (or LLM_SHARD_API_KEY) or "
                                       "--api-key-file, not both")
            try:
                api_key = api_key_file.read_bytes().decode("utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                raise click.BadParameter(f"cannot read a key from {api_key_file}: {e}",
                                         param_hint="--api-key-file") from None
            if not api_key:
                raise click.BadParameter(f"{api_key_file} is empty",
                                         param_hint="--api-key-file")
        return f(api_key=api_key or None, **kwargs)

    verb = click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path),
                        default=None, help="Read the API key from this file (UTF-8; "
                        "surrounding whitespace dropped).")(verb)
    return click.option("--api-key", envvar="LLM_SHARD_API_KEY", default=None,
                        help=f"{API_KEY_HELP[f.__name__]} (env LLM_SHARD_API_KEY). On the "
                        "command line it shows in `ps`: prefer the environment or "
                        "--api-key-file.")(verb)


def _stop_ray() -> None:
    """Disconnect from Ray; the private local Ray this process started stops with it
    (Ray recorded it in no address file, so none is left behind)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


@cli.command(help=SERVE_HELP)
@click.argument("model")
@engine_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@_api_key_options
@click.option("--max-prompts-per-request", default=MAX_PROMPTS_PER_REQUEST, show_default=True,
              type=click.IntRange(1, None),
              help="Prompts one /v1/completions request may carry (400 beyond).")
@click.option("--served-model-name", default=None,
              help="The model's name in the API (default: MODEL as given).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(model, engine, host, port, api_key, max_prompts_per_request, served_model_name,
          log_level) -> None:
    from llm_shard.coordinator.http import bind, create_app, run

    try:
        sock = bind(host, port)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    port = sock.getsockname()[1]
    llm = None
    try:
        llm = _open_llm(model, engine)
        click.echo(llm.describe_plan())
        name = served_model_name or model
        app = create_app(llm, model_name=name, api_key=api_key,
                         max_prompts_per_request=max_prompts_per_request)
        url = f"http://{host if host not in ('0.0.0.0', '::') else '127.0.0.1'}:{port}"
        click.echo(f"serving {name} on {url} (chat page: {url}/, OpenAI API: {url}/v1)"
                   + ("; API key required" if api_key else ""), err=True)
        run(app, sock, log_level=log_level)
    finally:
        sock.close()
        if llm is not None:
            llm.shutdown()
        _stop_ray()
        if llm is not None:
            click.echo("stopped: workers shut down", err=True)


CHAT_HELP = """Chat in the terminal with MODEL (loaded here, on Ray) or with the server at URL.

Replies stream as they are generated; the conversation is kept and rendered with the
model's chat template. Type /clear to forget the conversation, /quit (or Ctrl-D) to leave."""


@cli.command(help=CHAT_HELP)
@click.argument("target", metavar="MODEL|URL")
@engine_options
@_api_key_options
@click.option("--system", default=None, help="A system message to start the conversation.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(1, None))
@click.option("--temperature", default=0.7, show_default=True, type=click.FloatRange(0))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1))
def chat(target, engine, api_key, system, max_tokens, temperature, top_p) -> None:
    from llm_shard.coordinator.chat import chat_loop, local_reply, remote_reply

    sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
    if target.startswith(("http://", "https://")):
        from llm_shard.coordinator.client import Client

        with Client(target, api_key=api_key, retries=2) as client:
            chat_loop(lambda messages: remote_reply(client, messages, sampling), system)
        return
    llm = None
    try:
        llm = _open_llm(target, engine)
        if llm.tokenizer is None:
            raise click.ClickException(f"{llm.store.path} has no tokenizer to chat with")
        chat_loop(lambda messages: local_reply(llm, messages, sampling), system)
    finally:
        if llm is not None:
            llm.shutdown()
        _stop_ray()


cli.add_command(node_resources)


def main() -> None:
    cli(prog_name="llm-shard")

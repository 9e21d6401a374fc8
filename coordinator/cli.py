"""The `llm-shard` command line. Each verb is thin: it parses, calls the library, prints.

Expected failures (bad paths, unknown names, corrupt stores) print one line, never a
traceback; `--debug` shows the traceback for bug reports.
"""

from __future__ import annotations

import json
import sys

import click

from llm_shard.models import UnknownArch, arch_names
from llm_shard.models.convert import ConvertError
from llm_shard.models.sources import SourceError
from llm_shard.models.store import DTYPES, StoreError
from llm_shard.models.tokenizer import TokenizerError

EXPECTED = (ConvertError, SourceError, StoreError, UnknownArch, TokenizerError, FileExistsError)


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EXPECTED as e:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks of expected errors.")
def cli(debug: bool) -> None:
    """llm-shard: run big language models across a home lab of cheap machines."""


@cli.command()
@click.argument("src")
@click.option("--arch", type=click.Choice(arch_names()), default=None,
              help="Architecture; may be left out when SRC says it (GGUF, config.json).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="int8", show_default=True)
@click.option("-o", "--out", "out", required=True, help="Store folder to create.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at OUT.")
def convert(src: str, arch: str | None, dtype: str, out: str, overwrite: bool) -> None:
    """Convert a checkpoint (HF folder, Meta folder, Megatron file, GGUF) into a store."""
    from pathlib import Path

    from llm_shard.models.convert import convert as run

    if (Path(out) / "manifest.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a store; pass --overwrite to replace it")
    store = run(src, out, arch=arch, dtype=dtype)
    size = sum(f["bytes"] for f in store.manifest["files"])
    click.echo(f"wrote {store.path}: {store.manifest['arch']}, {store.n_blocks} blocks, "
               f"{dtype}, {size / 2**20:.1f} MiB")


@cli.command()
@click.argument("store")
def verify(store: str) -> None:
    """Check every file of a store against the sha256 in its manifest."""
    from llm_shard.models.store import Store

    s = Store.open(store)
    s.verify()
    click.echo(f"{s.path}: {len(s.manifest['files'])} files OK")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(as_json: bool) -> None:
    """Known model names, where their weights come from, and what is stored locally."""
    from llm_shard.models.catalog import home, local_status

    rows = local_status()
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"store folder: {home()}")
    for r in rows:
        local = f"{r['bytes'] / 2**20:8.1f} MiB" if r["store"] else "   not local"
        click.echo(f"  {r['name']:16} {r['arch']:12} {local}  {r['source']}")


@cli.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(1, None))
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="int8", show_default=True)
def generate(model: str, prompt: str, max_tokens: int, chat: bool, dtype: str) -> None:
    """Greedy one-shot generation in this process, streamed to the terminal."""
    from llm_shard.models.catalog import resolve
    from llm_shard.models.runner import LocalModel
    from llm_shard.models.tokenizer import StreamDecoder

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


@cli.command()
@click.argument("model")
@click.option("--worker", "workers", multiple=True, required=True,
              help="A worker's budget, e.g. ram=2GiB,disk=8GiB,gpu=4GiB (repeat per worker).")
@click.option("--objective", type=click.Choice(["latency", "throughput"]), default="latency",
              show_default=True)
@click.option("--cache-tokens", default=4096, show_default=True, type=click.IntRange(0, None),
              help="KV-cache tokens to reserve on every block (all sequences together).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="int8", show_default=True)
def plan(model: str, workers: tuple[str, ...], objective: str, cache_tokens: int,
         dtype: str) -> None:
    """Print the partition table for MODEL over the given workers, loading nothing."""
    from llm_shard.cluster.types import Capacity, Tier
    from llm_shard.coordinator.planner import ModelCost, PlanError, WorkerSpec, format_plan
    from llm_shard.coordinator.planner import plan as make_plan
    from llm_shard.models.catalog import resolve

    store = resolve(model, dtype=dtype)
    try:
        specs = [WorkerSpec(Capacity.parse(w), {t: NOMINAL_SPEED[t.value] for t in Tier})
                 for w in workers]
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--worker") from None
    cost = ModelCost.from_manifest(store.manifest, cache_tokens,
                                   store.config.cache_bytes_per_token)
    try:
        p, report = make_plan(cost, specs, objective=objective)
    except PlanError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{store.path.name}: {store.n_blocks} blocks, {dtype}; nominal speeds "
               f"(workers calibrate on start): {NOMINAL_SPEED}")
    click.echo(format_plan(p, report, cost))


@cli.group()
def bench() -> None:
    """Benchmarks that print figures and ratios to physical limits."""


@bench.command("kernels", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_kernels(args: tuple[str, ...]) -> None:
    """GB/s of weight bytes for fp32, bf16 and int8 linear kernels vs memory bandwidth."""
    from llm_shard.benchmarks.kernels import main as kernels_main

    kernels_main(list(args))


def main() -> None:
    cli(prog_name="llm-shard")

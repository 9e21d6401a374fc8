"""`/metrics`: a Prometheus registry per app (so several apps in one process do not clash)
holding the engine's figures, read at scrape time, and HTTP requests by path and status."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


def registry(llm) -> tuple[CollectorRegistry, Counter]:
    """The app's registry, and its counter of HTTP requests labelled (path, status)."""
    reg = CollectorRegistry()
    reg.register(EngineCollector(llm))
    http = Counter("llm_shard_http_requests", "HTTP requests by path and status",
                   ["path", "status"], registry=reg)
    return reg, http


class EngineCollector:
    """The scheduler's counters and gauges, and each worker's own figures."""

    def __init__(self, llm) -> None:
        self.llm = llm

    def collect(self):
        if self.llm.scheduler is None:
            return
        m = self.llm.metrics()
        yield CounterMetricFamily("llm_shard_requests", "Requests the scheduler took",
                                  value=m["requests_total"])
        yield CounterMetricFamily("llm_shard_generated_tokens", "Tokens generated",
                                  value=m["tokens_total"])
        done = CounterMetricFamily("llm_shard_finished", "Requests finished, by reason",
                                   labels=["reason"])
        for reason, n in sorted(m["finished_total"].items()):
            done.add_metric([reason], n)
        yield done
        yield CounterMetricFamily("llm_shard_recoveries", "Re-plans after a worker loss",
                                  value=m["recoveries_total"])
        yield CounterMetricFamily("llm_shard_scheduler_failures", "Scheduler loop failures "
                                  "(each failed the requests in flight and freed every cache)",
                                  value=m["scheduler_failures_total"])
        restarts = CounterMetricFamily("llm_shard_worker_restarts", "Times the worker "
                                       "was replaced after a loss", labels=["worker"])
        for w in self.llm.stats()["workers"]:
            restarts.add_metric([str(w["index"])], w["restarts"])
        yield restarts
        yield GaugeMetricFamily("llm_shard_queue_waiting", "Requests waiting for cache",
                                value=m["waiting"])
        yield GaugeMetricFamily("llm_shard_running", "Requests being generated",
                                value=m["running"])
        yield _per_stage("llm_shard_stage_seconds", "Compute seconds of one step per stage "
                         "(moving average)", m["stage_seconds"])
        yield from self.prediction_families(m["stage_seconds"])
        yield _per_stage("llm_shard_stage_busy_seconds", "Seconds a stage holds a step, "
                         "receipt to send: compute, decoding, caches, sampling (moving "
                         "average)", m["busy_seconds"])
        yield GaugeMetricFamily("llm_shard_step_seconds", "A micro-batch's round trip "
                                "through every stage (moving average)",
                                value=m["step_seconds"])
        yield GaugeMetricFamily("llm_shard_wire_seconds", "A step's round trip less the "
                                "time stages held it: every hop's transport, and queueing "
                                "behind other micro-batches (moving average)",
                                value=m["wire_seconds"])
        yield CounterMetricFamily("llm_shard_cache_waits", "Requests that waited in the "
                                  "queue for cache room", value=m["cache_waits_total"])
        yield CounterMetricFamily("llm_shard_prefix_hits", "Requests that started from a "
                                  "finished sequence's cached prefix",
                                  value=m["prefix_hits_total"])
        yield CounterMetricFamily("llm_shard_prefix_reused_tokens", "Prompt tokens taken "
                                  "from the prefix cache instead of prefilled",
                                  value=m["prefix_tokens_reused_total"])
        yield CounterMetricFamily("llm_shard_prefix_evictions", "Cached prefixes freed to "
                                  "make room", value=m["prefix_evictions_total"])
        yield GaugeMetricFamily("llm_shard_prefix_cached_sequences", "Finished sequences "
                                "whose caches the stages keep", value=m["prefix_cached_sequences"])
        yield from self.worker_families()

    def prediction_families(self, measured: list[float]):
        """The plan's estimate of each stage's seconds per step and, once steps have run,
        how far the measured ones are from it (planner.prediction_errors)."""
        from llm_shard.coordinator.planner import prediction_errors

        report = self.llm.plan_report
        yield _per_stage("llm_shard_stage_predicted_seconds", "The plan's estimate of a "
                         "stage's compute seconds per decode step of one sequence",
                         [s.seconds for s in report.stages])
        if len(measured) == len(report.stages):
            yield _per_stage("llm_shard_stage_prediction_error", "Measured over predicted "
                             "stage seconds, less 1 (0.2: 20 % slower than planned)",
                             prediction_errors(report, measured))

    def worker_families(self):
        """Per worker: bytes of its blocks in each tier, disk-tier bytes read (rate() gives
        swap reads per second) and the seconds they took, bytes streamed to its GPU,
        resident memory."""
        tiers = GaugeMetricFamily("llm_shard_worker_block_bytes", "Bytes of the worker's "
                                  "blocks in each memory tier", labels=["worker", "tier"])
        read = CounterMetricFamily("llm_shard_swap_read_bytes", "Bytes of disk-tier blocks "
                                   "read (streamed)", labels=["worker"])
        read_s = CounterMetricFamily("llm_shard_swap_read_seconds", "Seconds spent reading "
                                     "disk-tier blocks", labels=["worker"])
        copied = CounterMetricFamily("llm_shard_gpu_stream_bytes", "Bytes of RAM- and "
                                     "disk-tier blocks copied to a GPU worker's GPU",
                                     labels=["worker"])
        rss = GaugeMetricFamily("llm_shard_worker_rss_bytes", "Resident memory of the worker "
                                "process", labels=["worker"])
        for index, st in sorted(self.llm.worker_stats().items()):
            w = str(index)
            for tier, n in sorted(st["bytes_by_tier"].items()):
                tiers.add_metric([w, tier], n)
            read.add_metric([w], st["swap_bytes_read"])
            read_s.add_metric([w], st["swap_read_seconds"])
            copied.add_metric([w], st["gpu_stream_bytes"])
            rss.add_metric([w], st["rss"])
        yield from (tiers, read, read_s, copied, rss)


def _per_stage(name: str, documentation: str, values: list[float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["stage"])
    for i, s in enumerate(values):
        family.add_metric([str(i)], s)
    return family

"""System metrics (CPU, memory, disk, network; GPU when there is one) in the run's System
metrics tab.

MLflow samples them for runs it starts with `mlflow.start_run`; Lightning's `MLFlowLogger`
creates its run through the client, so MLflow's switch never starts its monitor
(Lightning-AI/pytorch-lightning#20563). This callback uses MLflow's own monitors and settings
(`MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`; `..._SAMPLES_BEFORE_LOGGING`; `..._NODE_ID`) and
writes through the run's writer, so an outage keeps them in the journal. Where they are not
set, a sample every `INTERVAL` seconds, each logged: MLflow's 10 s would give a run of seconds
no point while it trains (a sample costs ~1 ms of a thread, a write one SQLite transaction).
The CLI adds it unless `--log_system_metrics false` (or `MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=
false`).
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from lightning.pytorch import Callback, LightningModule, Trainer

from mlplab.tracking.logger import MLflowRunLogger

PREFIX = "system/"
INTERVAL = 1.0  # seconds, where MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL is not set


class SystemMetrics(Callback):
    """Samples on a thread while a stage runs, one point per `samples_before_logging` samples,
    and one at the end of each stage (so a run of seconds has one too)."""

    def __init__(self) -> None:
        self.monitor = None
        self.writer = None
        self.step = 0
        self.samples = 0
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __deepcopy__(self, memo) -> SystemMetrics:
        """One sampler per run, shared by copies (see `RunWriter.__deepcopy__`)."""
        return self

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        logger = trainer.logger
        if not isinstance(logger, MLflowRunLogger) or not trainer.is_global_zero:
            return
        if self.monitor is None:
            # MLflow's internal monitor: its public switch starts it only for runs of
            # `mlflow.start_run`, never for Lightning's (Lightning-AI/pytorch-lightning#20563)
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # "Skip logging GPU metrics" on every CPU run: not news
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
            import mlflow
            from mlflow.environment_variables import (
                MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING as samples,
            )
            from mlflow.environment_variables import (
                MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL as interval,
            )

            if not interval.defined:
                mlflow.set_system_metrics_sampling_interval(INTERVAL)
            if not samples.defined:
                mlflow.set_system_metrics_samples_before_logging(1)
            self.monitor = SystemMetricsMonitor(logger.run_id, tracking_uri=logger.tracking_uri)
            self.writer = logger.experiment
            if logger.resumed:  # continue the run's steps
                history = self.writer.client.get_metric_history(
                    logger.run_id, f"{PREFIX}cpu_utilization_percentage"
                )
                self.step = max((m.step for m in history), default=-1) + 1
        self.stop.clear()
        self.thread = threading.Thread(target=self.sample, daemon=True, name="system-metrics")
        self.thread.start()

    def sample(self) -> None:
        while not self.stop.wait(self.monitor.sampling_interval):
            self.monitor.collect_metrics()
            self.samples += 1
            if self.samples % self.monitor.samples_before_logging == 0:
                self.publish()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.thread is None:
            return
        self.stop.set()
        self.thread.join()
        self.thread = None
        self.monitor.collect_metrics()
        self.publish()

    def publish(self) -> None:
        from mlflow.entities import Metric

        metrics = self.monitor.aggregate_metrics()
        for monitor in self.monitor.monitors:
            monitor.clear_metrics()
        prefix = PREFIX + (f"{self.monitor.node_id}/" if self.monitor.node_id else "")
        now = int(time.time() * 1000)
        points = [Metric(prefix + k, v, now, self.step) for k, v in metrics.items()]
        self.step += 1
        try:
            self.writer.log_batch(self.writer.run_id, metrics=points)
        except Exception as err:  # noqa: BLE001 - a sample is never worth a failed fit
            print(f"mlplab: system metrics not logged ({err})", file=sys.stderr)

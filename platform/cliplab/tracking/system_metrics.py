"""MLflow's system-metrics sampler (``system/*``) for a tracked run, started and finished by the trainer."""

from __future__ import annotations

import logging


def start_system_metrics(cfg, tracker):
    """MLflow's CPU/memory/GPU sampler (``system/*``) on the tracked rank, when enabled."""
    uri = getattr(tracker, "uri", None)
    if not (cfg.tracking.system_metrics and uri and getattr(tracker, "run_id", None)):
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(tracker.run_id, sampling_interval=10.0, samples_before_logging=1,
                                       tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as err:  # noqa: BLE001 - system metrics are a nice-to-have, never fatal
        logging.getLogger(__name__).warning("MLflow system metrics are off: %s", err)
        return None


def stop_system_metrics(monitor) -> None:
    """Stop the sampler, then publish what it sampled since its last publish plus one last sample.

    MLflow's monitor publishes only after a full sampling interval and drops its pending samples on
    ``finish()``, so without this a run shorter than the interval would have no ``system/*`` at all.
    """
    monitor.finish()
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as err:  # noqa: BLE001 - system metrics are a nice-to-have, never fatal
        logging.getLogger(__name__).warning("MLflow system metrics: the last sample was not logged: %s", err)

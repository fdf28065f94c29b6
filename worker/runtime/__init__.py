"""What runs the job path: the RabbitMQ broker (its consumer trusts nothing on the wire),
worker processes and their supervisor, the watchdog that restarts dead threads, the seal on
options workers put on requeued messages, dramatiq middleware (retries, metrics), the metric
definitions, health probes, queue gauges and the sweeper; the sealing of tenant secrets
(``secrets_box``) and the confinement of tenant files and token commands (``secret_files``);
retention and the failing-login gauge (``retention``, ``housekeeping``)."""

"""What runs the job path: the RabbitMQ broker, worker processes and their supervisor, dramatiq
middleware (retries, metrics), the metric definitions, health probes, queue gauges and the sweeper."""

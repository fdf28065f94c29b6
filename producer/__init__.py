"""Validate document jobs and publish them to RabbitMQ for the workers."""

from producer.envelope import encode, envelope
from producer.parse import InvalidLine, parse_jobs, read_jobs
from producer.publish import PublishError, publish, publish_messages

__all__ = [
    "InvalidLine",
    "PublishError",
    "encode",
    "envelope",
    "parse_jobs",
    "publish",
    "publish_messages",
    "read_jobs",
]

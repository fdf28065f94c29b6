"""Validate document jobs and publish them to RabbitMQ for the workers."""

from producer.envelope import encode, envelope
from producer.publish import InvalidLine, PublishError, parse_jobs, publish, publish_messages

__all__ = ["InvalidLine", "PublishError", "encode", "envelope", "parse_jobs", "publish", "publish_messages"]

"""What operators run besides the workers: the dead-letter queue, the tenant file, DKIM keys, the
test mail and the demo. The job path never imports these."""

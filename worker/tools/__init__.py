"""What operators run besides the workers: the dead-letter queue, the tenant file, DKIM keys, the
test mail, the suppression list, moving the queues to another type (``queues``), rotating the
key of tenant secrets and naming the database role (``secrets``) and the demo. The job path never imports these."""

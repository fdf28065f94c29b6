"""Support for the demo and the tests, not for production: the embedded SMTP sink (with its fault
variants) and sample business documents."""

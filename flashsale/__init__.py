"""flashsale: the order service, the stream-to-PostgreSQL order writer, the audit,
the command line and the embedded runtime that starts real Redis and PostgreSQL servers.

The reservation engine itself lives in the separate ``inventory`` package.
"""

__version__ = "0.1.0"

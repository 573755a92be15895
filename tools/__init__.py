"""Command-line tools: the `ledger` client CLI (and later the benchmark, cluster and chaos tools)."""

"""Command-line tools: the `ledger` client CLI (`tools.cli`), the benchmark (`ledger-bench`,
`tools.bench`), the local cluster launcher (`ledger cluster`, `tools.cluster`), the chaos harness
(`ledger-chaos`, `tools.chaos`) and the flood and bound probes (`tools.flood`, `tools.probe_bounds`)."""

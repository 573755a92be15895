"""The Converge Ledger node: sockets, storage, the engine and the `ledger-node` entry point."""

__version__ = "0.1.0"

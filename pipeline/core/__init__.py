"""The lowest room (docs/architecture.md): what every other room may import and which imports nothing of ours."""

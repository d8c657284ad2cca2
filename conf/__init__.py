"""The hydra configs, importable as `clipforge.conf` (pyproject.toml maps this folder there), so
`clipforge-train` finds them through `pkg://clipforge.conf` from any directory and any install."""

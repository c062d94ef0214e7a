"""The typed, documented configuration schema, its TOML loader and the embedded default."""

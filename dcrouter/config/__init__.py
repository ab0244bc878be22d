"""Configuration: the options schema, loading from TOML/JSON, validation."""

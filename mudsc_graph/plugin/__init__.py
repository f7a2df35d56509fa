"""The plugin system: hook specifications, the records plugins register, the registry."""

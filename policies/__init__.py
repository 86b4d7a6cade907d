"""Built-in and example policies, shipped as package data (autoglm_tune.policies)."""

"""autoglm-tune: plan and apply system tuning for a local LLM server on a low-spec Linux machine."""

__version__ = "0.1.0"

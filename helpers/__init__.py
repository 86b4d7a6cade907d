"""autoglm-tune's root helper and its public contract (knob catalogue, plan schema)."""

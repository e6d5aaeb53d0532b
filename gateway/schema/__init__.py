"""Typed shapes of each provider's wire format, one module per schema."""

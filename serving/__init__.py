"""OpenAI-compatible streaming HTTP server over the TokenFlow-JAX engine."""

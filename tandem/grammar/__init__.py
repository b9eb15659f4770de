"""Structured output: grammars (JSON schema, regex, Lark/GBNF) compiled with llguidance, and the
per-request matchers the worker uses to mask each constrained row's logits (see
`tandem/gpu_worker/grammar_state.py` for where the mask is applied and why there)."""

"""Tool calling: how a model's chat template is given tools (its own tools section, or tandem's
generic preamble), the grammar that forces a call (tool_choice required or named), and the
parsers that find calls in a reply, whole or streamed."""

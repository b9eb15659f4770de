"""Text <-> token ids, as llama.cpp does it: the vocabulary read from a GGUF file (`build`,
`pretokenizers`, `vocab_spelling`) or a Hugging Face folder (`hf`), which tokens are special and end
generation (`special_tokens`), and streaming detokenization (`detokenizer`). `tokenizer.Tokenizer`
is the one object the rest of tandem holds."""

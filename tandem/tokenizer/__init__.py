"""Text <-> token ids, as llama.cpp does it: the vocabulary read from a GGUF file (`build`,
`pretokenizers`, `vocab_spelling`) or a Hugging Face folder (`hf`), which tokens are special and end
generation (`special_tokens`), streaming detokenization (`detokenizer`), and the
tokenizer and config of a model file, read without torch (`model_files`). `tokenizer.Tokenizer`
is the one object the rest of tandem holds."""

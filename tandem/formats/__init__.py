"""Model files: GGUF headers and tensors (`gguf_metadata`, `gguf_file`), quantized blocks as packed
codes or dequantized floats (`gguf_packed`, `dequant`), safetensors folders and the common weight
naming (`loader`), the architecture config (`model_config`), checks made from headers alone
(`model_check`, `file_access`), and random-weight files for tests and benchmarks
(`tiny`, `synthetic`). The `nn.Module`s that run the weights live in `tandem.gpu_worker.model`."""

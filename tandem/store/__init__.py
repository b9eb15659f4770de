"""The local model store: names and manifests (`registry`), downloads (`pull`), the operations the
CLI and `/api/*` call (`model_store`: resolve, list, remove), what `show` prints (`describe`), and
which local paths a remote client may pull (`local_paths`). No torch here."""

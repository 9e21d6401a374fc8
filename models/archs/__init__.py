"""Architectures, one module each; CPM-2 with its BMInf reader and tokenizer as a subpackage."""

"""Text: tokenizers, chat templates and sampling."""

"""Data pipeline: raw text -> tokenizer -> packed token blocks -> webdataset shards -> batches."""

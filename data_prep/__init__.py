"""`python -m data_prep`: tokenize local files or a Hugging Face dataset into Megatron .bin/.idx."""

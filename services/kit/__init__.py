"""The demo kit (``ddk fixtures``): a corpus from files on the machine, a tokenizer, a teacher and a student."""

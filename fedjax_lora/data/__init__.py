"""Clinical information-extraction data: corpus readers, sites, instruction tasks, tokenization."""

"""Document identifiers: docid tokens, schemes, semantic ids, the trie and beam search, retrieval, BM25."""

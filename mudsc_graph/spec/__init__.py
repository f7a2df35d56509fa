"""The analysis's product: the MergeSpec, its axis expressions, and permutations of its groups."""

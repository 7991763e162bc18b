"""medgen.infer."""
